"""Export trained runs as an ONNX model package (and, with --web, a static page that predicts in the browser).

    python -m cxr.tools.export --run RUN [--run RUN2 ...] --ood OOD_RUN --out DIR
                         [--thresholds REPORT/thresholds.json] [--calibration REPORT/calibration.json |
                          --no-calibration] [--resolution R] [--web SITE]

DIR gets
  model.onnx        the ensemble as ONE graph: image [B,1,R,R] (normalised as the loader does)
                    → probs [B,14] = mean of the members' sigmoid(logits), and, when every member
                    is pooled-linear (GAP + linear head), cam [B,14,h,w] = mean of the members'
                    class activation maps M_c = Σ_k w_ck f_k (gradient-free CAM; h×w = first member's grid)
  ood.onnx          the gate: image [B,1,r,r] at the autoencoder's resolution → score [B,1], the Mahalanobis
                    distance of log(1 − SSIM) and the image statistics of cxr.tools.ood.image_features
  thresholds.json   per-label operating points o (the evaluator's tuned thresholds of the ensemble, or 0.5
                    without --thresholds), the operating-point scale f(x) = x/(2o) for x ≤ o, else
                    1 − (1−x)/(2(1−o)), and ``probabilities``: which numbers the page and cxr-predict show —
                    "calibrated" (calibration.json's maps) or "operating-point" (f, as before calibration)
  calibration.json  with "calibrated": the evaluator's post-hoc maps (temperature / Platt per label, fitted
                    on its threshold split; the format of cxr.evaluation.calibration), from --calibration or, by default,
                    the calibration.json next to --thresholds; --no-calibration keeps the operating-point scale
  preprocess.json   how the loader makes its input: PIL "L" grey, PIL Lanczos resize, (x/255 − mean)/std
  manifest.json     every file with its sha256 and size, the runs, versions

Members with metadata fusion are refused (the page has no age/sex/view to give them). The legacy
TorchScript-based exporter (``dynamo=False``) is used: the dynamo exporter needs onnxscript and
is not needed for these graphs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cxr.evaluation.calibration import CALIBRATION_FILE
from cxr.tools.onnx_resize import _upsample_bicubic_aa, _upsample_bilinear_aa
from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError, cli_entry
from cxrbase.labels import LABELS

OPSET = 18  # Resize's antialias attribute (the fixed-size stems) needs 18
CALIBRATION = "f(x) = x/(2o) for x <= o, else 1 - (1-x)/(2(1-o)); o maps to 0.5"
WEB_VENDOR = Path(__file__).resolve().parents[2] / "build" / "npm" / "node_modules" / "onnxruntime-web"
WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs")
WEB_SOURCE = Path(__file__).resolve().parents[1] / "web"
# dicom-parser (npm, installed beside onnxruntime-web by scripts/web-deps.sh): the page's DICOM header parser
DICOM_VENDOR = WEB_VENDOR.parent / "dicom-parser"
DICOM_FILES = ("dicomParser.min.js",)


class EnsembleGraph(nn.Module):
    """Members → (probs [B,L] mean of sigmoids, cam [B,L,h,w] mean of CAMs or nothing)."""

    def __init__(self, members: Sequence[nn.Module], with_cam: bool):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.with_cam = with_cam

    def forward(self, image: torch.Tensor):
        probs, cams = [], []
        for m in self.members:
            if not self.with_cam:
                probs.append(torch.sigmoid(m(image)))
                continue
            fmap = m.features(image)
            probs.append(torch.sigmoid(m.head(m.pool(fmap), None)))
            cam = torch.einsum("lc,bchw->blhw", m.classifier_weight, fmap)
            if cams and cam.shape[-2:] != cams[0].shape[-2:]:
                cam = nn.functional.interpolate(cam, size=cams[0].shape[-2:], mode="bilinear", align_corners=False)
            cams.append(cam)
        mean = torch.stack(probs).mean(0)
        return (mean, torch.stack(cams).mean(0)) if self.with_cam else mean


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, outputs: Sequence[str]) -> None:
    """torch.onnx.export (legacy exporter), dynamic batch, fixed H×W, input name ``image``."""
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bilinear2d_aa", _upsample_bilinear_aa, OPSET)
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _upsample_bicubic_aa, OPSET)
    axes = {"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=list(outputs),
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    tmp.replace(path)


def load_members(runs: Sequence[str]):
    """[(member record, model in eval mode on CPU)] of classifier runs; metadata models are refused."""
    from cxr.evaluation.inference import member_names
    from cxr.runs.open import open_member

    def check(member) -> None:
        run = member.run_dir
        if member.config.model.name == "ood_ae":
            raise CxrError(f"{run}: an ood_ae run given to --run — pass it to --ood, classifier runs to --run")
        if member.uses_meta:
            raise CxrError(
                f"{run}/config.yaml: model.metadata={member.config.model.metadata} — the page "
                f"has no patient age/sex/view to feed it; export members trained with metadata=none"
            )
        if list(member.labels) != list(LABELS):
            raise CxrError(f"{run}: labels {member.labels[:3]}… differ from the 14 NIH labels — export NIH classifiers")

    out = []
    for run, name in zip(runs, member_names(runs)):
        member = open_member(run, name, "cpu", check)
        out.append((member, member.model))
    norms = {(m.config.data.mean, m.config.data.std) for m, _ in out}
    if len(norms) > 1:
        raise CxrError(
            f"--run: the members were trained with different data.mean/std {sorted(norms)} — "
            f"export members with one normalisation (the page normalises once)"
        )
    return out


def operating_points(path: str | None, n_members: int, member_name: str, method: str) -> dict:
    """thresholds.json document: the evaluator's tuned thresholds of the ensemble (or the one member)."""
    doc = {
        "labels": list(LABELS),
        "calibration": CALIBRATION,
        "method": method,
        "source": None,
        "operating_points": [0.5] * len(LABELS),
    }
    if path is None:
        doc["note"] = "no --thresholds given: operating points 0.5 (calibration is the identity)"
        return doc
    from cxr.evaluation.report import ENSEMBLE, read_thresholds

    tuned = read_thresholds(path)
    key = ENSEMBLE if n_members > 1 else member_name
    try:
        by_label = tuned["members"][key][method]
    except (KeyError, TypeError) as err:
        raise CxrError(
            f"{path}: no {method} thresholds of member {key!r} ({err}) — pass the evaluator's "
            f"REPORT/thresholds.json of the same runs (python -m cxr.evaluate --runs ...)"
        ) from None
    ops = [float(by_label[name]) for name in LABELS]
    bad = [n for n, o in zip(LABELS, ops) if not 0 < o < 1]
    if bad:
        raise CxrError(
            f"{path}: operating points of {bad[:3]} are not inside (0, 1) — re-tune on a val split "
            f"with positives of every label"
        )
    doc.update(operating_points=ops, source=str(path), tuned_on=tuned.get("tuned_on"))
    return doc


def probability_mapping(
    out: Path,
    thresholds: str | None,
    calibration: str | None,
    keep_mapping: bool,
    n_members: int,
    member_name: str,
) -> dict:
    """Which probabilities the package shows (thresholds.json's ``probabilities`` and a note); with
    calibration, write its maps to OUT/calibration.json (cxr.evaluation.calibration's format and writer)."""
    from cxr.evaluation.calibration import beside, calibration_for, describe, write_calibration
    from cxr.evaluation.report import ENSEMBLE

    if keep_mapping and calibration:
        raise CxrError(
            f"--calibration {calibration} with --no-calibration: choose one (calibrated maps or the "
            "operating-point scale)"
        )
    (out / CALIBRATION_FILE).unlink(missing_ok=True)  # a re-export into the same folder starts clean
    path = None if keep_mapping else (calibration or beside(thresholds))
    if path is None:
        why = "--no-calibration" if keep_mapping else "no calibration.json given or next to --thresholds"
        return {
            "probabilities": "operating-point",
            "probabilities_note": f"operating-point scale f ({why}): 0.5 is each label's operating point; "
            "not a calibrated probability"
            if thresholds
            else f"the model's probability ({why}; no --thresholds: operating points 0.5, f is the identity)",
        }
    doc = calibration_for(path, (ENSEMBLE,) if n_members > 1 else (member_name, ENSEMBLE), LABELS)
    write_calibration(out, {**doc, "source": str(path)})
    return {"probabilities": "calibrated", "probabilities_note": describe(doc)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def _preprocess_doc(res: int, outputs: list[str], member, gate_member, ood_res: int, gate_doc: dict) -> dict:
    """preprocess.json: how the page and cxr-predict make the model's and the gate's inputs."""
    from shards.image_codec import RESIZE_FILTER

    # the mean/std the evaluator normalises with: the runs' typed data sections (an old config.yaml
    # without them: the defaults those runs trained with)
    model_data = member.config.data
    gate_data = gate_member.config.data
    return {
        "grey": "PIL Image.convert('L'): L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 (R=G=B stays)",
        "resize": f"as the loader (cxr.data.shard_index.to_resolution): {RESIZE_FILTER} to R×R, when not R×R",
        "resize_filter": "lanczos",
        "normalise": "float32 (x - mean*255) / (std*255), x the uint8 pixel",
        "model": {
            "resolution": res,
            "mean": model_data.mean,
            "std": model_data.std,
            "input": "image",
            "outputs": outputs,
        },
        "ood": {
            "resolution": ood_res,
            "mean": gate_data.mean,
            "std": gate_data.std,
            "threshold": gate_doc["threshold"],
            "percentile": gate_doc["percentile"],
            "rule": "reject when score > threshold",
            "score": "Mahalanobis distance of log(1 - SSIM) and image statistics (cxr.tools.ood.FEATURES) "
            "from the gate's train images",
        },
        "labels": list(LABELS),
    }


def export_package(
    runs: Sequence[str],
    ood_run: str,
    out: Path,
    resolution: int | None = None,
    thresholds: str | None = None,
    method: str = "f1",
    calibration: str | None = None,
    keep_mapping: bool = False,
) -> dict:
    """Write the package of the module docstring into ``out``; return the manifest."""
    from cxr.tools.ood import GateScore, load_gate, read_threshold

    gate_doc = read_threshold(ood_run)  # before any export: an old gate without a feature model fails here
    members = load_members(runs)
    res = int(resolution or members[0][0].resolution or 224)
    with_cam = all(getattr(model, "pooled_linear", False) for _, model in members)
    graph = EnsembleGraph([model for _, model in members], with_cam)
    outputs = ["probs", "cam"] if with_cam else ["probs"]
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(graph, torch.zeros(1, 1, res, res), out / "model.onnx", outputs)
    gate, gate_member = load_gate(ood_run)
    ood_res = int(gate_member.resolution or 64)
    export_onnx(
        GateScore(gate, gate_doc["features"], explicit_ssim=True),
        torch.zeros(1, 1, ood_res, ood_res),
        out / "ood.onnx",
        ["score"],
    )
    ops = operating_points(thresholds, len(members), members[0][0].name, method)
    shown = probability_mapping(out, thresholds, calibration, keep_mapping, len(members), members[0][0].name)
    ops.update(shown)
    write_json(out / "thresholds.json", ops)
    write_json(out / "preprocess.json", _preprocess_doc(res, outputs, members[0][0], gate_member, ood_res, gate_doc))
    files = ["model.onnx", "ood.onnx", "thresholds.json", "preprocess.json"]
    files += [CALIBRATION_FILE] if shown["probabilities"] == "calibrated" else []
    manifest = {
        "files": {f: {"sha256": sha256(out / f), "bytes": (out / f).stat().st_size} for f in files},
        "ensemble": "one graph, mean of member probabilities" if len(members) > 1 else "one member",
        "members": [
            {
                "name": m.name,
                "run": str(m.run_dir),
                "checkpoint": str(m.checkpoint),
                "model": m.config.model.name,
            }
            for m, _ in members
        ],
        "ood_run": str(ood_run),
        "cam": with_cam,
        "probabilities": shown["probabilities_note"],
        "opset": OPSET,
        "versions": {"torch": torch.__version__, "onnx": _version("onnx")},
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def write_site(package: Path, site: Path, vendor: Path = WEB_VENDOR, dicom_vendor: Path = DICOM_VENDOR) -> list[str]:
    """Copy the page, the package files, onnxruntime-web's wasm build and dicom-parser into ``site``; list the files."""
    dist = vendor / "dist"
    missing = [str(dist / f) for f in WEB_FILES if not (dist / f).is_file()]
    missing += [str(dicom_vendor / "dist" / f) for f in DICOM_FILES if not (dicom_vendor / "dist" / f).is_file()]
    if missing:
        raise CxrError(
            f"{missing[0]}: the page's npm files {missing} missing — run `make web-deps` "
            f"(scripts/web-deps.sh npm: npm install onnxruntime-web dicom-parser into build/npm)"
        )
    site.mkdir(parents=True, exist_ok=True)
    (site / CALIBRATION_FILE).unlink(missing_ok=True)  # the page must not show a stale package's maps
    copied = []
    for src in [
        *(WEB_SOURCE / f for f in ("index.html", "chester.js", "resize.js", "dicom.js", "calibrate.js")),
        *(package / f for f in ("model.onnx", "ood.onnx", "thresholds.json", "preprocess.json", "manifest.json")),
        *([package / CALIBRATION_FILE] if (package / CALIBRATION_FILE).is_file() else []),
        *(dist / f for f in WEB_FILES),
        *(dicom_vendor / "dist" / f for f in DICOM_FILES),
    ]:
        shutil.copyfile(src, site / src.name)
        copied.append(src.name)
    version = json.loads((vendor / "package.json").read_text())["version"]
    dicom_version = json.loads((dicom_vendor / "package.json").read_text())["version"]
    files = {f: sha256(site / f) for f in copied}
    write_json(site / "site.json", {"onnxruntime-web": version, "dicom-parser": dicom_version, "files": files})
    return copied + ["site.json"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cxr.tools.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="RUN",
        help="a classifier run dir (repeat for an ensemble member each)",
    )
    p.add_argument("--ood", required=True, metavar="RUN", help="the ood_ae run dir (with ood_threshold.json)")
    p.add_argument("--out", required=True, help="package folder to write")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="input size R of model.onnx (default: the first member's training resolution)",
    )
    p.add_argument(
        "--thresholds",
        metavar="FILE",
        help="the evaluator's REPORT/thresholds.json of these runs (default: operating points 0.5)",
    )
    p.add_argument("--method", choices=["f1", "youden"], default="f1", help="which tuned thresholds (default: f1)")
    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="the evaluator's REPORT/calibration.json of these runs: the page and cxr-predict show calibrated "
        "probabilities (default: the calibration.json next to --thresholds, when there is one)",
    )
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="keep the operating-point scale x/(2o) (0.5 = the tuned threshold) instead of calibrated probabilities",
    )
    p.add_argument(
        "--web",
        metavar="SITE",
        help="also write the static page (index.html, JS, ONNX files, "
        "onnxruntime-web) into SITE; needs `make web-deps` once",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    vendored = [WEB_VENDOR / "dist" / f for f in WEB_FILES] + [DICOM_VENDOR / "dist" / f for f in DICOM_FILES]
    if args.web and not all(f.is_file() for f in vendored):
        write_site(Path(args.out), Path(args.web))  # fails before the export, naming the command to run
    manifest = export_package(
        args.run,
        args.ood,
        Path(args.out),
        args.resolution,
        args.thresholds,
        args.method,
        calibration=args.calibration,
        keep_mapping=args.no_calibration,
    )
    line = (
        f"exported {len(manifest['members'])} member(s) + ood gate → {args.out} "
        f"({', '.join(manifest['files'])}; cam {'yes' if manifest['cam'] else 'no'}; shows "
        f"{manifest['probabilities']})"
    )
    if args.web:
        files = write_site(Path(args.out), Path(args.web))
        line += f"; page {args.web}/index.html ({len(files)} files)"
    print(f"{line} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
