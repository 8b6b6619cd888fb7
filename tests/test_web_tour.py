"""`scripts/demo_tour.py web` — the README's headless way to open images through an exported page."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from web_page import runs, site, web_tools  # noqa: F401 — the exported page (tests/web_page.py)

ROOT = Path(__file__).resolve().parents[1]
TOUR = [sys.executable, str(ROOT / "scripts" / "demo_tour.py"), "web"]


def test_web_tour_refuses_what_it_cannot_open_in_one_line(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    done = subprocess.run(
        [*TOUR, "--site", str(site_dir), "--images", "x.png", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"{site_dir}: no index.html — export the page first (python -m cxr.tools.export ... --web {site_dir})"
    ]
    (site_dir / "index.html").write_text("<html></html>")
    done = subprocess.run(
        [*TOUR, "--site", str(site_dir), "--images", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"{tmp_path / 'missing.png'}: no such file — pass PNG or JPEG files"
    ]


@pytest.mark.slow
def test_web_tour_opens_user_files_through_the_page(site, web_tools, tmp_path):  # noqa: F811
    """A phantom (in distribution) gets findings, a texture is rejected; one screenshot each, and
    results.json says what the page showed (checked against the page's own preprocess.json)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    images = [shutil.copyfile(site["dir"] / name, mine / name) for name in ("phantom.png", "texture.jpg")]
    out = tmp_path / "web"
    done = subprocess.run(
        [
            *TOUR,
            "--site",
            str(site["dir"]),
            "--images",
            *map(str, images),
            "--out",
            str(out),
            "--chromium",
            web_tools["chromium"],
            "--playwright",
            web_tools["playwright"],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert "note" not in doc  # the demo's "toy models" note only with --demo-note
    by_image = {r["image"]: r for r in doc["results"]}
    threshold = json.loads((site["dir"] / "preprocess.json").read_text())["ood"]["threshold"]
    phantom, texture = by_image["phantom.png"], by_image["texture.jpg"]
    assert phantom["state"] == "done" and len(phantom["top"]) == 3 and phantom["ood_score"] <= threshold
    assert texture["state"] == "rejected" and texture["top"] == [] and texture["ood_score"] > threshold
    for r in doc["results"]:
        assert (out / r["screenshot"]).stat().st_size > 1000
    assert "page: texture.jpg: rejected" in done.stdout
