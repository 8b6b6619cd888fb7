"""DICOM in the browser page: cxr/web/dicom.js (with the npm dicom-parser the export copies beside it) against
shards.dicom.read_dicom (pydicom) on the fixtures of tests/dicom_data.py — every pixel, in node — and the page in
headless Chromium on a DICOM: its gate score and probabilities equal onnxruntime in Python on the tensor Python
makes from the same file (read_dicom → the loader's resize → normalise). Compressed files are refused in one line.

Needs node and the npm packages (`make web-deps`); the Chromium part also chromium (tests/test_web.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dicom_data import dicom_bytes, ramp
from web_page import open_page, runs, site, web_tools  # noqa: F401 — the page's fixtures (export, server, Chromium)

from cxr.tools.export import DICOM_VENDOR

pytestmark = pytest.mark.integration  # node and Chromium subprocesses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dicom_parser() -> Path:
    if not shutil.which("node"):
        pytest.skip("node missing: install Node.js, then run `make web-deps`")
    script = DICOM_VENDOR / "dist" / "dicomParser.min.js"
    if not script.is_file():
        if not shutil.which("npm"):
            pytest.skip("npm missing: install Node.js, then run `make web-deps`")
        subprocess.run(["bash", str(ROOT / "scripts" / "web-deps.sh"), "npm"], check=True, timeout=900)
    return script


def _node_grey(parser: Path, files: list[Path], tmp_path: Path) -> list[dict]:
    """dicom.js's toGrey on each file in node: {w, h, grey: path of the raw bytes} or {error}."""
    script = f"""
        globalThis.window = globalThis;
        globalThis.dicomParser = require({json.dumps(str(parser))});
        require({json.dumps(str(ROOT / "cxr" / "web" / "dicom.js"))});
        const fs = require("fs");
        const out = [];
        for (const [i, f] of {json.dumps([str(f) for f in files])}.entries()) {{
          try {{
            const r = CxrDicom.toGrey(new Uint8Array(fs.readFileSync(f)), f);
            const path = {json.dumps(str(tmp_path))} + `/grey${{i}}.bin`;
            fs.writeFileSync(path, r.grey);
            out.push({{ w: r.w, h: r.h, grey: path, voi: r.voi }});
          }} catch (err) {{ out.push({{ error: err.message }}); }}
        }}
        console.log(JSON.stringify(out));
    """
    done = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = {
    "mono2_window_12bit": dict(stored=ramp(), WindowCenter=2000, WindowWidth=3000),
    "mono1_window_rescale": dict(
        stored=ramp(seed=1),
        photometric="MONOCHROME1",
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=4000,
        WindowWidth=6001,
    ),
    "linear_exact": dict(stored=ramp(seed=2), WindowCenter=1500, WindowWidth=2500, VOILUTFunction="LINEAR_EXACT"),
    "sigmoid": dict(stored=ramp(seed=3), WindowCenter=2048, WindowWidth=1800, VOILUTFunction="SIGMOID"),
    "min_max_no_window": dict(stored=ramp(seed=4)),
    "mono1_8bit_identity": dict(
        stored=ramp(bits=8, seed=5), bits_stored=8, photometric="MONOCHROME1", WindowCenter=128, WindowWidth=256
    ),
}


def _write(tmp_path: Path, name: str, case: dict) -> Path:
    case = dict(case)
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(dicom_bytes(case.pop("stored"), **case))
    return path


def test_page_dicom_pixels_equal_pythons(dicom_parser, tmp_path):
    from shards.dicom import read_dicom

    files = [_write(tmp_path, name, case) for name, case in CASES.items()]
    lut = _voi_lut_file(tmp_path)
    files.append(lut)
    got = _node_grey(dicom_parser, files, tmp_path)
    for path, result in zip(files, got):
        assert "error" not in result, (path.name, result)
        want = read_dicom(path).pixels
        grey = np.frombuffer(Path(result["grey"]).read_bytes(), np.uint8).reshape(result["h"], result["w"])
        diff = np.abs(grey.astype(int) - want.astype(int))
        # exact but for SIGMOID, where JS's exp() may differ from numpy's in the last bit at a rounding edge
        assert diff.max() <= (1 if "sigmoid" in path.name else 0), (path.name, int(diff.max()), int((diff > 0).sum()))


def _voi_lut_file(tmp_path: Path) -> Path:
    """A VOI LUT Sequence (first item used), 12-bit entries, first mapped value 100, as a modality writes it."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = tmp_path / "voi_lut.dcm"
    path.write_bytes(dicom_bytes(ramp(seed=7), WindowCenter=1, WindowWidth=10))
    ds = dcmread(path)
    item = Dataset()
    entries = np.clip(np.sqrt(np.arange(4000)) * 65, 0, 4095).astype(np.uint16)
    item.LUTDescriptor = [len(entries), 100, 12]
    item.LUTData = entries.astype("<u2").tobytes()  # OW, little endian as the file
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path)
    return path


def test_page_refuses_what_it_cannot_read_in_one_line(dicom_parser, tmp_path):
    from dicom_data import structured_report

    cases = {
        "jpeg_lossless.dcm": dicom_bytes(ramp(), syntax="jpeg-lossless"),
        "multi.dcm": dicom_bytes(ramp(), frames=3),
        "report.dcm": structured_report(),
        "no_preamble.dcm": dicom_bytes(ramp(), preamble=False),
    }
    files = []
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        files.append(tmp_path / name)
    got = _node_grey(dicom_parser, files, tmp_path)
    want = {
        "jpeg_lossless.dcm": "compressed",
        "multi.dcm": "multi-frame",
        "report.dcm": "not an image",
        "no_preamble.dcm": "no DICOM preamble",
    }
    for path, result in zip(files, got):
        assert want[path.name] in result.get("error", ""), (path.name, result)
        assert "\n" not in result["error"] and result["error"].startswith(str(path))


@pytest.mark.slow
def test_page_scores_a_dicom_as_python_does(site, web_tools, tmp_path):  # noqa: F811
    """The page fed a 12-bit MONOCHROME1 DICOM (?image=…, the file input's path): its gate score and probabilities
    equal onnxruntime in Python on read_dicom → Pillow's Lanczos → float32 normalise (not cxr's own resize code)."""
    import onnxruntime as ort
    from PIL import Image

    from shards.dicom import read_dicom

    rng = np.random.default_rng(3)
    phantom = np.asarray(Image.open(site["dir"] / "phantom.png").convert("L"), np.float64)  # 256 px, in-distribution
    stored = np.clip((255 - phantom) * 16 + rng.integers(0, 16, phantom.shape), 0, 4095).astype(np.uint16)
    data = dicom_bytes(stored, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    (site["dir"] / "study.dcm").write_bytes(data)
    result = open_page(site, web_tools, "study.dcm")
    assert result["state"] in ("done", "rejected"), result
    grey = Image.fromarray(read_dicom(data).pixels, "L")
    pre = json.loads((site["dir"] / "preprocess.json").read_text())
    assert pre["resize_filter"] == "lanczos"

    def tensor(spec: dict) -> np.ndarray:
        r = int(spec["resolution"])
        px = np.asarray(grey if grey.size == (r, r) else grey.resize((r, r), Image.LANCZOS), np.float32)
        return ((px - np.float32(spec["mean"] * 255)) / np.float32(spec["std"] * 255))[None, None]

    score = ort.InferenceSession(str(site["dir"] / "ood.onnx")).run(None, {"image": tensor(pre["ood"])})[0]
    assert abs(float(result["ood"]) - float(score.reshape(-1)[0])) < 1e-4 * max(1.0, abs(float(score.reshape(-1)[0])))
    if result["state"] == "done":
        probs = ort.InferenceSession(str(site["dir"] / "model.onnx")).run(None, {"image": tensor(pre["model"])})[0][0]
        page = {r["label"]: float(r["prob"]) for r in result["rows"]}
        np.testing.assert_allclose([page[label] for label in pre["labels"]], probs, atol=1e-4, rtol=0)
