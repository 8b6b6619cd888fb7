"""cxr/tools/export.py: onnxruntime equals PyTorch for every exportable family (a batch of 2 at 224, one 1024 image),
the ensemble graph, the package files (sha256, operating points) and the web-vendor error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.models import build_model
from cxr.tools.export import EnsembleGraph, export_onnx, write_site
from cxr.tools.export import main as export_main
from cxrbase.errors import CxrError

ort = pytest.importorskip("onnxruntime")
# fp32 ONNX kernels vs PyTorch's: sums are reordered; probabilities agree to ~1e-6, logits/CAMs to ~1e-4 relative
PROB_TOL = 1e-5


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]  # conftest.py


@pytest.fixture(scope="module")
def runs(export_runs):
    """The gate, two cnn members and their report (tests/conftest.py export_runs, built once per session)."""
    return export_runs


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _compare(model: torch.nn.Module, res: int, tmp_path: Path, batch: int = 2) -> None:
    """ONNX probabilities (and CAMs) equal PyTorch's on `batch` random images at `res` (exported at batch 1:
    a batch of 2 also checks the dynamic batch axis). The feature map for the CAM by hand is the trunk's
    output in that same forward (`features()` = trunk(stem(x)); a hook, not a second forward)."""
    torch.manual_seed(0)
    graph = EnsembleGraph([model.eval()], with_cam=bool(model.pooled_linear))
    export_onnx(
        graph, torch.zeros(1, 1, res, res), tmp_path / "m.onnx", ["probs", "cam"] if graph.with_cam else ["probs"]
    )
    x = torch.randn(batch, 1, res, res)
    fmaps: list[torch.Tensor] = []
    hook = model.trunk.register_forward_hook(lambda _m, _i, out: fmaps.append(out))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    got = _session(tmp_path / "m.onnx").run(None, {"image": x.numpy()})
    np.testing.assert_allclose(got[0], torch.sigmoid(logits).numpy(), atol=PROB_TOL, rtol=0)
    if graph.with_cam:  # CAM by hand: classifier weights over the feature map
        [fmap] = [f.numpy() for f in fmaps]
        cam = np.einsum("lc,bchw->blhw", model.classifier_weight.detach().numpy(), fmap)
        np.testing.assert_allclose(got[1], cam, atol=1e-4 * max(1.0, np.abs(cam).max()), rtol=1e-4)


# Exportable families (metadata fusion is refused by the exporter: the page has no age/sex/view).
FAST = [("cnn", {})]
SLOW = [
    ("densenet121", {}),
    ("densenet121_cbam", {}),
    ("resnet50", {}),
    ("resnet50", {"conv_stem": True}),
    ("vit", {}),
    ("beit", {}),
]


@pytest.mark.parametrize(
    "name,kwargs",
    FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW],
    ids=lambda v: v if isinstance(v, str) else "-".join(v) or "plain",
)
def test_onnxruntime_equals_pytorch_at_224(name, kwargs, tmp_path):
    _compare(build_model(name, 14, **kwargs), 224, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", FAST + SLOW, ids=lambda v: v if isinstance(v, str) else "-".join(v) or "plain")
def test_onnxruntime_equals_pytorch_at_1024(name, kwargs, tmp_path):
    if name == "vit":  # same dynamic-size code path; ViT-B/16 at 1024² (4,096 tokens) takes minutes on 2 CPU cores
        kwargs = {**kwargs, "arch": "vit_tiny_patch16_224"}
    _compare(build_model(name, 14, **kwargs), 1024, tmp_path, batch=1)  # the batch axis: the 224 test's


def test_ensemble_graph_is_mean_of_member_probabilities(tmp_path):
    torch.manual_seed(1)
    members = [build_model("cnn", 14).eval() for _ in range(2)]
    export_onnx(EnsembleGraph(members, with_cam=True), torch.zeros(1, 1, 64, 64), tmp_path / "e.onnx", ["probs", "cam"])
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        mean = np.mean([torch.sigmoid(m(x)).numpy() for m in members], axis=0)
    probs, cam = _session(tmp_path / "e.onnx").run(None, {"image": x.numpy()})
    np.testing.assert_allclose(probs, mean, atol=PROB_TOL, rtol=0)
    assert cam.shape == (3, 14, 2, 2)


# ------------------------------------------------------------------ the package from runs ---


def test_package_files_hashes_and_operating_points(runs, tmp_path):
    out = tmp_path / "pkg"
    assert (
        export_main(
            [
                "--run",
                str(runs["members"][0]),
                "--run",
                str(runs["members"][1]),
                "--ood",
                str(runs["gate"]),
                "--out",
                str(out),
                "--thresholds",
                str(runs["report"] / "thresholds.json"),
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    # the report's calibration.json (fitted on val) is packed by default (tests/test_calibrated_deploy.py)
    packed = {"model.onnx", "ood.onnx", "thresholds.json", "preprocess.json", "calibration.json"}
    assert set(manifest["files"]) == packed
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    tuned = json.loads((runs["report"] / "thresholds.json").read_text())["members"]["ensemble"]["f1"]
    ops = json.loads((out / "thresholds.json").read_text())
    assert ops["operating_points"] == [tuned[label] for label in ops["labels"]]
    pre = json.loads((out / "preprocess.json").read_text())
    gate_doc = json.loads((runs["gate"] / "ood_threshold.json").read_text())
    assert pre["ood"]["threshold"] == gate_doc["threshold"] and pre["model"]["resolution"] == 64


def test_ood_onnx_equals_pytorch_msssim_gate(runs, tmp_path):
    """ood.onnx (SSIM written out) = the Python gate (pytorch-msssim) = the NumPy distance of its features,
    on loader-like inputs (uint8 pixels of X-ray-like phantoms and non-X-rays) and on random ones."""
    from ood_data import TEST_KINDS, textures, to_pixels

    from cxr.tools.ood import feature_distance, load_scorer, read_threshold

    out = tmp_path / "pkg"
    assert export_main(["--run", str(runs["members"][0]), "--ood", str(runs["gate"]), "--out", str(out)]) == 0
    scorer = load_scorer(runs["gate"])
    pre = json.loads((out / "preprocess.json").read_text())["ood"]
    phantoms = to_pixels([_open(p) for p in sorted((runs["root"] / "synth" / "images").glob("*.png"))[:4]])
    pixels = np.concatenate([phantoms, textures(2, 3), *(to_pixels(make(1, 5)) for make in TEST_KINDS.values())])
    loader_like = (pixels.astype(np.float32) - np.float32(pre["mean"] * 255)) / np.float32(pre["std"] * 255)
    torch.manual_seed(2)
    x = torch.cat([torch.from_numpy(loader_like[:, None]), torch.randn(4, 1, 64, 64) * 0.5])
    with torch.no_grad():
        want = scorer(x).numpy()  # pytorch-msssim inside
        feats = scorer.features(x).double().numpy()
    got = _session(out / "ood.onnx").run(None, {"image": x.numpy()})[0]
    assert np.ptp(want) > 1.0  # distinct scores, so the comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        want[:, 0], feature_distance(feats, read_threshold(runs["gate"])["features"]), rtol=1e-4, atol=1e-4
    )
    assert pre["threshold"] == read_threshold(runs["gate"])["threshold"]


def _open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("L")


def test_metadata_member_and_missing_vendor_are_refused(runs, tmp_path):
    import shutil

    import yaml

    member = tmp_path / "meta"
    shutil.copytree(runs["members"][0], member)
    cfg = yaml.safe_load((member / "config.yaml").read_text())
    cfg["model"]["metadata"] = "concat"
    (member / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CxrError, match="metadata=concat"):
        export_main(["--run", str(member), "--ood", str(runs["gate"]), "--out", str(tmp_path / "x"), "--debug"])
    with pytest.raises(CxrError, match="make web-deps"):
        write_site(tmp_path / "x", tmp_path / "site", vendor=tmp_path / "no-such-npm")
