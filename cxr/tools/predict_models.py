"""cxr-predict's models (cxr/tools/predict.py): an exported package or training run dirs → a
:class:`Scorer` (preprocessing, scores, OOD gate, heat maps), and which probabilities it shows
(calibrated, operating-point scale or raw)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrbase.errors import CxrError


# ---------------------------------------------------------------------------------------------- scorers
@dataclass
class Scorer:
    """What a model source provides: labels, operating points, grey masters → model inputs (``prepare``, run
    on a worker thread a batch ahead) and those inputs → (probs [B,L], gate [B] or None) (``score``)."""

    labels: list[str]
    operating_points: np.ndarray
    has_gate: bool
    threshold: float | None
    prepare: Callable[[list[np.ndarray]], Any]
    score: Callable[[Any], tuple[np.ndarray, np.ndarray | None]]
    description: str
    # image [H,W] uint8, label indices → maps [k,H,W] ≥ 0 at the image's size (None: no maps for this model)
    heat: Callable[[np.ndarray, list[int]], np.ndarray] | None = None
    heat_method: str = ""
    heat_notes: list[str] = field(default_factory=list)  # which layer each member's maps come from
    calibration: dict | None = None  # a calibration.json document (cxr.evaluation.calibration): its maps are shown


def open_package(folder: Path) -> Scorer:
    """An exported package (cxr.tools.export): onnxruntime sessions and its preprocess.json; no torch."""
    import onnxruntime as ort

    pre = _read_json(folder / "preprocess.json")
    ops = _read_json(folder / "thresholds.json")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    gate = ort.InferenceSession(str(folder / "ood.onnx"), providers=["CPUExecutionProvider"])
    model_cfg, ood_cfg = pre["model"], pre["ood"]

    resize = package_resize(pre, folder)

    def tensor(images: list[np.ndarray], cfg: dict) -> np.ndarray:
        return model_input(images, int(cfg["resolution"]), float(cfg["mean"]), float(cfg["std"]), resize)

    def prepare(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return tensor(images, model_cfg), tensor(images, ood_cfg)

    def score(prepared: tuple[np.ndarray, np.ndarray]):
        x, g = prepared
        probs = session.run(["probs"], {"image": x})[0]
        gate_score = gate.run(["score"], {"image": g})[0].reshape(-1)
        return np.asarray(probs, np.float64), np.asarray(gate_score, np.float64)

    with_cam = "cam" in [o.name for o in session.get_outputs()]

    def heat(image: np.ndarray, labels: list[int]) -> np.ndarray:
        cam = session.run(["cam"], {"image": tensor([image], model_cfg)})[0][0]  # [L,h,w], members' mean CAM
        return np.stack([_resize_map(np.maximum(cam[j], 0), image.shape) for j in labels])

    return Scorer(
        labels=list(pre["labels"]),
        operating_points=np.asarray(ops["operating_points"], float),
        has_gate=True,
        threshold=float(ood_cfg["threshold"]),
        prepare=prepare,
        score=score,
        description=f"package {folder} (onnxruntime)",
        heat=heat if with_cam else None,
        heat_method="CAM (the package's ensemble CAM)",
    )


def _open_members(runs: Sequence[Path], dev) -> list:
    """The runs as ensemble members, each with its model built on ``dev``; refused when a member fuses
    metadata, has another label set or no training resolution."""
    from cxr.evaluation.inference import member_names
    from cxr.runs.open import build_member_model, read_member

    members = [read_member(run, name) for run, name in zip(runs, member_names(runs))]
    for m in members:
        if m.uses_meta:
            raise CxrError(
                f"{m.run_dir}/config.yaml: member {m.name} fuses metadata (age, sex, view), which "
                "files do not reliably carry — predict with members trained without metadata"
            )
        if m.labels != members[0].labels:
            raise CxrError(
                f"{m.run_dir}: member {m.name} has other labels than {members[0].name} — one "
                "ensemble needs one label set"
            )
        if m.resolution is None:
            raise CxrError(f"{m.run_dir}/config.yaml: no data.resolution — restore the run's config")
        m.model = build_member_model(m, dev)
    return members


def _open_gate(ood: Path, dev) -> tuple:
    """An ood_ae run → (GateScore module, its input resolution, fitted threshold, its (mean, std))."""
    from cxr.tools.ood import GateScore, load_gate, read_threshold

    ae, gate_member = load_gate(ood, device=str(dev))
    fitted = read_threshold(ood)
    return (
        GateScore(ae, fitted["features"]).to(dev).eval(),
        int(gate_member.resolution or 64),
        fitted["threshold"],
        gate_model_data(ae),
    )


def _operating_points(thresholds: str | None, members: list, labels: list[str], method: str) -> np.ndarray:
    """The tuned operating points from ``thresholds`` (checked to be these runs' labels), else 0.5 each."""
    from cxr.tools.export import operating_points

    points = np.full(len(labels), 0.5)  # no tuned thresholds: calibration is the identity
    if thresholds is not None:
        ops = operating_points(thresholds, len(members), members[0].name, method)
        if ops["labels"] != labels:
            raise CxrError(
                f"{thresholds}: thresholds for another label set than the runs' — pass the "
                "thresholds.json of these runs' report (python -m cxr.evaluate --runs …)"
            )
        points = np.asarray(ops["operating_points"], float)
    return points


def open_runs(runs: Sequence[Path], ood: Path | None, thresholds: str | None, method: str, device: str) -> Scorer:
    """Training run dirs (an ensemble) and an optional gate run, preprocessed as the loaders do."""
    import torch

    from cxr.evaluation.inference import ensemble_scores

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    members = _open_members(runs, dev)
    # each member's mean/std as the evaluator normalises for it: its run's data section
    norm = {m.name: m.config.data for m in members}
    gate = None if ood is None else _open_gate(ood, dev)
    labels = list(members[0].labels)
    points = _operating_points(thresholds, members, labels, method)

    def tensor(images: list[np.ndarray], size: int, mean: float, std: float):
        return torch.from_numpy(model_input(images, size, mean, std)).to(dev)

    def spec(m) -> tuple[int, float, float]:  # (size, mean, std) of a member's input
        return int(m.resolution), norm[m.name].mean, norm[m.name].std

    specs = {spec(m) for m in members} | ({(gate[1], *gate[3])} if gate is not None else set())

    def prepare(images: list[np.ndarray]) -> dict:
        return {s: model_input(images, *s) for s in specs}

    @torch.inference_mode()
    def score(prepared: dict):
        probs = {}
        for m in members:
            x = torch.from_numpy(prepared[spec(m)]).to(dev)
            probs[m.name] = torch.sigmoid(m.model(x, meta=None).double()).cpu().numpy()
        gate_score = None
        if gate is not None:
            x = torch.from_numpy(prepared[(gate[1], *gate[3])]).to(dev)
            gate_score = gate[0](x).double().reshape(-1).cpu().numpy()
        return ensemble_scores(probs), gate_score

    layers: dict[str, str] = {}
    notes: list[str] = []

    def heat(image: np.ndarray, label_ids: list[int]) -> np.ndarray:
        """Grad-CAM of every member on its default layer (cxr.tools.explain.choose_layer), clipped at 0,
        upsampled with half-pixel centres to the image, averaged over the members."""
        from cxr.tools.explain import choose_layer, gradcam_maps, upsample

        total = None
        for m in members:
            size = int(m.resolution)
            if m.name not in layers:
                name, grid, why = choose_layer(m.model, "gradcam", size)
                layers[m.name] = name
                notes.append(f"{m.name}: layer {name}, a {grid[0]}×{grid[1]} map at {size} px ({why})")
            x = tensor([image], size, norm[m.name].mean, norm[m.name].std)
            maps = upsample(gradcam_maps(m.model, x, label_ids, layer=layers[m.name]).clamp(min=0), image.shape)
            total = maps[0] if total is None else total + maps[0]
        return (total / len(members)).cpu().numpy()

    return Scorer(
        labels=labels,
        operating_points=points,
        has_gate=gate is not None,
        heat=heat,
        heat_method="Grad-CAM (mean over the members)",
        heat_notes=notes,
        threshold=None if gate is None else float(gate[2]),
        prepare=prepare,
        score=score,
        description=f"{len(members)} run(s) on {dev}: {', '.join(m.name for m in members)}",
    )


def model_input(images: list[np.ndarray], size: int, mean: float, std: float, resize=None) -> np.ndarray:
    """Grey masters [H, W] → float32 [B, 1, size, size] as the evaluation loader makes them: resized by
    cxr.data.shard_index.to_resolution (``resize``: another resize, for a package exported with one),
    normalised by cxr.data.config.normalise_."""
    from cxr.data.config import normalise_
    from cxr.data.shard_index import to_resolution

    px = np.stack([(resize or to_resolution)(im, size) for im in images]).astype(np.float32)
    return normalise_(px, mean, std)[:, None]


def package_resize(pre: dict, folder: Path):
    """The resize a package's preprocess.json names: the loader's (``resize_filter`` "lanczos", packages
    from this version on) or PIL bilinear (packages exported before it, whose page resized so)."""
    name = pre.get("resize_filter", "bilinear")
    if name == "lanczos":
        return None  # model_input's default: the loader's own
    if name == "bilinear":
        from PIL import Image

        return lambda im, size: np.asarray(Image.fromarray(im, "L").resize((size, size), Image.BILINEAR))
    raise CxrError(f"{folder / 'preprocess.json'}: resize_filter {name!r} unknown — re-export the package")


def gate_model_data(model) -> tuple[float, float]:
    """The autoencoder's own (mean, std): load_gate copies them from its run's data section into ``norm``."""
    mean, std = (float(v) for v in model.norm.tolist())
    return mean, std


def _resize_map(heat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A map [h,w] → the image's [H,W]: PIL's bilinear on float32 (pixel centres at half-integers,
    as cxr.tools.explain.upsample's align_corners=False), without torch."""
    from PIL import Image

    return np.asarray(
        Image.fromarray(np.asarray(heat, np.float32), "F").resize((int(shape[1]), int(shape[0])), Image.BILINEAR)
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrError(f"{path}: missing — is {path.parent} a package written by python -m cxr.tools.export?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CxrError(f"{path}: unreadable JSON ({err}) — re-export the package") from None


def open_model(
    paths: Sequence[str],
    ood: str | None,
    thresholds: str | None,
    method: str,
    device: str,
    calibration: str | None = None,
    keep_mapping: bool = False,
) -> Scorer:
    """A package folder (manifest.json + model.onnx) or run dirs (config.yaml) → a Scorer, with the
    probability mapping it shows (see :func:`attach_mapping`)."""
    folders = [Path(p) for p in paths]
    for folder in folders:
        if not folder.is_dir():
            raise CxrError(f"{folder}: not found — pass training run dirs or a package from cxr.tools.export")
    if len(folders) == 1 and (folders[0] / "model.onnx").is_file():
        if ood or thresholds or calibration:
            raise CxrError(
                f"{folders[0]}: a package carries its own gate, operating points and calibration — "
                "drop --ood/--thresholds/--calibration (or re-export with them)"
            )
        scorer = open_package(folders[0])
        return attach_mapping(scorer, folders[0], None, None, keep_mapping)
    package = [f for f in folders if (f / "model.onnx").is_file()]
    if package:
        raise CxrError(f"{package[0]}: a package cannot be mixed with run dirs — pass one package or run dirs")
    scorer = open_runs(folders, Path(ood) if ood else None, thresholds, method, device)
    source = calibration or (_beside(thresholds) if thresholds else None)
    return attach_mapping(scorer, None, folders, source, keep_mapping)


# ------------------------------------------------------------------------------- shown probabilities
def _beside(thresholds: str) -> Path | None:
    from cxr.evaluation.calibration import beside

    return beside(thresholds)


def attach_mapping(
    scorer: Scorer, package: Path | None, runs: Sequence[Path] | None, calibration: Any, keep_mapping: bool
) -> Scorer:
    """Which probabilities ``scorer`` shows: a package's calibration.json when its thresholds.json
    says "calibrated"; for run dirs the ``calibration`` file (checked to be these runs' score set:
    ``ensemble`` for several, else the run's name); none of it with ``keep_mapping``."""
    from cxr.evaluation.calibration import CALIBRATION_FILE, calibration_for

    if keep_mapping:
        return scorer
    if package is not None:
        if _read_json(package / "thresholds.json").get("probabilities") == "calibrated":
            scorer.calibration = calibration_for(package / CALIBRATION_FILE, None, scorer.labels)
        return scorer
    if calibration:
        from cxr.evaluation.inference import member_names
        from cxr.evaluation.report import ENSEMBLE

        members = (ENSEMBLE,) if len(runs) > 1 else (member_names(list(runs))[0], ENSEMBLE)
        scorer.calibration = calibration_for(calibration, members, scorer.labels)
    return scorer


def mapping_kind(scorer: Scorer) -> str:
    """``calibrated``, ``operating-point`` (tuned thresholds, today's scale) or ``raw`` (neither)."""
    if scorer.calibration is not None:
        return "calibrated"
    return "raw" if np.all(scorer.operating_points == 0.5) else "operating-point"


def mapping_note(scorer: Scorer) -> str:
    """One line for the summary: what the label columns of predictions.csv hold."""
    from cxr.evaluation.calibration import describe

    kind = mapping_kind(scorer)
    if kind == "calibrated":
        return describe(scorer.calibration)
    if kind == "operating-point":
        return "operating-point scale x/(2o): 0.5 is each label's tuned threshold, not a calibrated probability"
    return "the model's probability (no tuned thresholds, no calibration)"


def shown_probabilities(scorer: Scorer, probs: np.ndarray) -> np.ndarray:
    """[B, L] the numbers predictions.csv shows: calibrated (cxr.evaluation.calibration's maps) or today's
    operating-point scale (cxr.evaluation.metrics.calibrate; the identity at operating points 0.5)."""
    if scorer.calibration is not None:
        from cxr.evaluation.calibration import calibrated

        return calibrated(probs, scorer.calibration, scorer.labels)
    from cxr.evaluation.metrics import calibrate

    return calibrate(probs, scorer.operating_points)


def _caption(scorer: Scorer, value: float) -> str:
    kind = mapping_kind(scorer)
    if kind == "calibrated":
        return f"calibrated p = {value:.3f}"
    if kind == "operating-point":
        return f"{value:.3f} on the operating-point scale (0.5 = operating point)"
    return f"p = {value:.3f}"
