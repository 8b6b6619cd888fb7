"""The browser page's shared fixtures: the exported site served on 127.0.0.1 and headless Chromium
(tests/test_web.py, tests/test_web_dicom.py import them; a test module never imports another)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import install_web_deps
from ood_data import TEST_KINDS, textures
from PIL import Image

from cxr.tools.export import WEB_VENDOR
from cxr.tools.export import main as export_main


@pytest.fixture(scope="module")
def runs(export_runs):
    """The gate, two cnn members and their report (tests/conftest.py export_runs, built once per session)."""
    return export_runs


ROOT = Path(__file__).resolve().parents[1]
PAGE_KINDS = ("plots", "documents", "colour blobs")
SHOTS = ROOT / "build" / "web-test"


@pytest.fixture(scope="module")
def web_tools() -> dict:
    """Chromium + node + the vendored npm packages; installed by scripts/web-deps.sh when missing."""
    reason = install_web_deps()
    if reason:
        pytest.skip(reason)
    return {"chromium": shutil.which("chromium"), "playwright": str(WEB_VENDOR.parent / "playwright-core")}


class CountingHandler(SimpleHTTPRequestHandler):
    seen: list = []

    def do_GET(self):
        self.seen.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(runs, web_tools, tmp_path_factory):  # noqa: F811
    """The page exported from the two members + gate, with test images, served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("web")
    member_args = [arg for m in runs["members"] for arg in ("--run", str(m))]
    assert (
        export_main(
            [
                *member_args,
                "--ood",
                str(runs["gate"]),
                "--out",
                str(root / "pkg"),
                "--thresholds",
                str(runs["report"] / "thresholds.json"),
                "--web",
                str(root / "site"),
            ]
        )
        == 0
    )
    # an in-distribution image that the page must resize: a phantom of the same generator at 256 px
    from shards.cli import main as shards_main

    assert (
        shards_main(
            ["synth", "--out", str(root / "synth"), "--n", "4", "--resolution", "256", "--seed", "9", "--workers", "1"]
        )
        == 0
    )
    phantom = sorted((root / "synth" / "images").glob("*.png"))[0]
    shutil.copyfile(phantom, root / "site" / "phantom.png")
    Image.fromarray(textures(1, 7, res=256)[0]).convert("RGB").save(root / "site" / "texture.jpg", quality=95)
    for kind in PAGE_KINDS:  # non-X-rays of the gate's bench, at their own size and colour
        TEST_KINDS[kind](1, 11)[0].save(root / "site" / f"{kind.replace(' ', '-')}.png")
    handler = type("Handler", (CountingHandler,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root / "site")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"dir": root / "site", "url": f"http://127.0.0.1:{server.server_address[1]}", "seen": handler.seen}
    server.shutdown()
    thread.join()


def open_page(site, web_tools, image: str, shot: Path | None = None) -> dict:
    """Open the served page on ``image`` in headless Chromium (tests/web_driver.cjs); its result JSON."""
    env = {**os.environ, "PLAYWRIGHT_CORE": web_tools["playwright"], "CHROMIUM": web_tools["chromium"]}
    cmd = ["node", str(ROOT / "tests" / "web_driver.cjs"), f"{site['url']}/index.html?image={image}"]
    done = subprocess.run(cmd + ([str(shot)] if shot else []), capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
