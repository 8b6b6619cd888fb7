"""The exported page in headless Chromium: served from 127.0.0.1, an image fed through the page's own
input path (?image=NAME → the same predict() as the file input), probabilities read from the DOM
compared with onnxruntime in Python on loader-made pixels (PIL), OOD rejection of a texture,
a screenshot in build/web-test/, and the server's request log (nothing but the page's own files).

Needs chromium (apt) and the npm packages (onnxruntime-web, playwright-core): `make web-deps`;
as root with apt-get the test installs them itself, as tests/test_slurm.py does for Slurm."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from web_page import PAGE_KINDS, ROOT, SHOTS, runs, site, web_tools  # noqa: F401 — the page's fixtures
from web_page import open_page as _open

pytestmark = pytest.mark.integration  # node and Chromium subprocesses (CONTRIBUTING.md)


ort = pytest.importorskip("onnxruntime")


def _loader_pixels(path: Path, res: int, mean: float, std: float) -> np.ndarray:
    """[1,1,res,res] float32 as the loader makes it (PIL L, Lanczos when not res×res, float32 normalise)."""
    with Image.open(path) as im:
        grey = im.convert("L")
        grey = grey if grey.size == (res, res) else grey.resize((res, res), Image.LANCZOS)
    x = (np.asarray(grey, np.float32) - np.float32(mean * 255)) / np.float32(std * 255)
    return x[None, None].astype(np.float32)


@pytest.mark.slow
def test_page_probabilities_equal_onnxruntime_and_nothing_else_is_fetched(site, web_tools):  # noqa: F811 — fixtures from web_page
    SHOTS.mkdir(parents=True, exist_ok=True)
    before = len(site["seen"])
    result = _open(site, web_tools, "phantom.png", SHOTS / "phantom.png")
    assert result["state"] == "done", result
    pre = json.loads((site["dir"] / "preprocess.json").read_text())
    ops = np.array(json.loads((site["dir"] / "thresholds.json").read_text())["operating_points"])
    m, o = pre["model"], pre["ood"]
    gate = ort.InferenceSession(str(site["dir"] / "ood.onnx"))
    score = gate.run(None, {"image": _loader_pixels(site["dir"] / "phantom.png", o["resolution"], o["mean"], o["std"])})
    assert abs(float(result["ood"]) - float(score[0][0, 0])) < 1e-4
    outputs = ort.InferenceSession(str(site["dir"] / "model.onnx")).run(
        None, {"image": _loader_pixels(site["dir"] / "phantom.png", m["resolution"], m["mean"], m["std"])}
    )
    probs = outputs[0][0]
    page = {r["label"]: float(r["prob"]) for r in result["rows"]}
    assert list(page) != [] and sorted(page) == sorted(pre["labels"])
    np.testing.assert_allclose([page[label] for label in pre["labels"]], probs, atol=1e-4, rtol=0)
    # the report's calibration.json was packed (export's default): the page shows calibrated probabilities,
    # each label's map written out here from its stored parameters (independent of the JS), in that order
    maps = json.loads((site["dir"] / "calibration.json").read_text())["labels"]
    assert result["legend"]["mapping"] == "calibrated" and {r["mapping"] for r in result["rows"]} == {"calibrated"}
    logit = np.log(np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7) / (1 - np.clip(probs, 1e-7, 1 - 1e-7)))
    z = [
        {"none": None, "temperature": logit[j] / e["temperature"], "platt": e["a"] * logit[j] + e["b"]}[e["method"]]
        for j, e in enumerate(maps[label] for label in pre["labels"])
    ]
    calibrated = np.array([probs[j] if zj is None else 1 / (1 + np.exp(-zj)) for j, zj in enumerate(z)])
    shown = [float(r["calibrated"]) for r in result["rows"]]
    np.testing.assert_allclose(shown, np.sort(calibrated)[::-1], atol=1e-4, rtol=0)
    assert [r["positive"] == "true" for r in result["rows"]] == [  # at the operating point, as the evaluator
        float(r["prob"]) >= ops[pre["labels"].index(r["label"])] for r in result["rows"]
    ]
    # the CAM overlay of the top finding: drawn unless its map is ≤ 0 everywhere (cxr.tools.explain's convention)
    if len(outputs) > 1:
        top = pre["labels"].index(result["rows"][0]["label"])
        empty = not (outputs[1][0, top] > 0).any()
        assert result["cam"]["empty"] == str(empty).lower(), result["cam"]
        assert ("no overlay" in result["cam"]["text"]) == empty and "clipped at 0" in result["cam"]["text"]
    # requests: the server saw the page's own files only, each once, and the page asked no other origin
    served = {p.split("?")[0].lstrip("/") for p in site["seen"][before:]}
    expected = {
        "index.html",
        "ort.wasm.min.js",
        "ort-wasm-simd-threaded.mjs",
        "ort-wasm-simd-threaded.wasm",
        "resize.js",
        "dicomParser.min.js",
        "dicom.js",
        "calibrate.js",
        "chester.js",
        "preprocess.json",
        "thresholds.json",
        "calibration.json",
        "model.onnx",
        "ood.onnx",
        "phantom.png",
    }
    assert served == expected, served ^ expected
    assert len(site["seen"]) - before == len(expected)
    assert all(u.startswith(site["url"] + "/") for u in result["requests"]), result["requests"]


@pytest.mark.slow
def test_page_rejects_a_texture(site, web_tools):  # noqa: F811
    result = _open(site, web_tools, "texture.jpg", SHOTS / "texture.png")
    assert result["state"] == "rejected", result
    assert result["rows"] == [] and "Rejected" in result["text"]
    pre = json.loads((site["dir"] / "preprocess.json").read_text())
    assert float(result["ood"]) > pre["ood"]["threshold"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", PAGE_KINDS)
def test_page_gate_score_equals_the_python_gate_and_rejects_non_x_rays(site, web_tools, runs, kind):  # noqa: F811
    """The page's gate (its own decode, grey, resize, ood.onnx in onnxruntime-web) against cxr.tools.ood's PyTorch
    gate on PIL-made pixels: the same score, and the image is rejected with no findings."""
    import torch

    from cxr.tools.ood import load_scorer

    name = f"{kind.replace(' ', '-')}.png"
    result = _open(site, web_tools, name)
    pre = json.loads((site["dir"] / "preprocess.json").read_text())["ood"]
    with torch.inference_mode():
        want = float(
            load_scorer(runs["gate"])(
                torch.from_numpy(_loader_pixels(site["dir"] / name, pre["resolution"], pre["mean"], pre["std"]))
            )
        )
    assert abs(float(result["ood"]) - want) <= 1e-4 * max(1.0, want), (result["ood"], want)
    assert result["state"] == "rejected" and result["rows"] == [], result


@pytest.mark.parametrize("filter_", ["lanczos", "bilinear"])
@pytest.mark.parametrize("size,out", [((1000, 913), 224), ((37, 64), 64), ((64, 64), 128), ((1024, 1024), 224)])
def test_page_resize_is_pillows(size, out, filter_, tmp_path):
    """cxr/web/resize.js (run in node) against PIL Image.resize LANCZOS (the loader's filter) and BILINEAR
    (packages exported before preprocess.json named resize_filter): every pixel equal."""
    if not shutil.which("node"):
        pytest.skip("node missing: install Node.js")
    rng = np.random.default_rng(size[0])
    w, h = size
    pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (h // 4 + 2, w // 4 + 2), dtype=np.uint8)).resize((w, h)))
    pixels = np.clip(pixels.astype(int) + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
    (tmp_path / "in.bin").write_bytes(pixels.tobytes())
    script = f"""
        globalThis.window = globalThis;
        require({json.dumps(str(ROOT / "cxr" / "web" / "resize.js"))});
        const fs = require("fs");
        const grey = new Uint8Array(fs.readFileSync({json.dumps(str(tmp_path / "in.bin"))}));
        fs.writeFileSync({json.dumps(str(tmp_path / "out.bin"))}, CxrPixels.resizeGrey(grey, {w}, {h}, {out}, {out}, "{filter_}"));
    """
    subprocess.run(["node", "-e", script], check=True, timeout=60)
    got = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.uint8).reshape(out, out)
    want = np.asarray(Image.fromarray(pixels).resize((out, out), getattr(Image, filter_.upper())))
    assert np.array_equal(got, want), (
        f"{int((got != want).sum())} pixels differ, max {np.abs(got.astype(int) - want).max()}"
    )


def test_page_cam_levels_follow_cxr_explain(tmp_path):
    """The page's CAM overlay levels (resize.js camLevels, run in node) and cxr.tools.explain's overlay_levels
    against the convention written out: ReLU, then ÷ max; a map ≤ 0 everywhere is empty (no overlay)."""
    from cxr.tools.explain import overlay_levels

    if not shutil.which("node"):
        pytest.skip("node missing: install Node.js")
    rng = np.random.default_rng(3)
    maps = {
        "signed": rng.normal(size=16),
        "all negative": -rng.random(16) - 0.1,
        "zero": np.zeros(16),
        "one positive": np.r_[-rng.random(15), 0.25],
    }
    (tmp_path / "in.json").write_text(json.dumps({k: v.tolist() for k, v in maps.items()}))
    script = f"""
        globalThis.window = globalThis;
        require({json.dumps(str(ROOT / "cxr" / "web" / "resize.js"))});
        const fs = require("fs");
        const maps = JSON.parse(fs.readFileSync({json.dumps(str(tmp_path / "in.json"))}, "utf8"));
        const out = {{}};
        for (const [k, v] of Object.entries(maps)) {{
          const r = CxrPixels.camLevels(Float32Array.from(v));
          out[k] = {{ levels: Array.from(r.levels), empty: r.empty }};
        }}
        fs.writeFileSync({json.dumps(str(tmp_path / "out.json"))}, JSON.stringify(out));
    """
    subprocess.run(["node", "-e", script], check=True, timeout=60)
    page = json.loads((tmp_path / "out.json").read_text())
    for name, values in maps.items():
        x = values.astype(np.float32)
        empty = not (x.max() > 0)
        want = np.zeros_like(x) if empty else np.maximum(x, 0) / x.max()
        assert page[name]["empty"] == empty, name
        np.testing.assert_allclose(page[name]["levels"], want, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(overlay_levels(x), want, atol=1e-6, err_msg=name)
    assert page["one positive"]["levels"][-1] == 1.0 and sum(page["one positive"]["levels"]) == 1.0
    # the min–max scaling the page used before would draw the all-negative map's least negative cell at full heat
    assert page["all negative"]["empty"] and not any(page["all negative"]["levels"])
