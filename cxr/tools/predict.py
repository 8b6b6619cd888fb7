"""`cxr-predict` — a trained ensemble on a folder of studies: DICOM, PNG or JPEG in, predictions.csv out.

    cxr-predict --model runs/m1 --model runs/m2 --ood runs/ood --thresholds reports/ens/thresholds.json \\
        studies/ --out predictions/
    cxr-predict --model build/pkg studies/*.dcm --out predictions/     # an exported ONNX package

``--model`` is one or more training run dirs (an ensemble: the mean of member probabilities, as
``cxr.evaluate``'s default) or one package written by ``cxr.tools.export`` (onnxruntime; torch is not
imported). Every image goes through the preprocessing its model was trained or exported with:
run dirs as the loaders do (grey master, ``shards.image_codec.resize_grey``, the run's mean/std),
a package as its ``preprocess.json`` says (what the browser page does). So a run dir's
probabilities equal the evaluator's on the same image packed into shards.

``OUT/predictions.csv``: one row per image — ``file``, the OOD gate's ``gate_score`` and ``gate``
verdict (accepted / rejected / none without a gate), ``probabilities`` (which numbers the label
columns hold), then per label the shown probability, ``<label>_decision`` (1 when the model's
probability is at or above the operating point; empty for a rejected image, which gets no
diagnosis) and ``raw_<label>`` (the model's probability). The shown probability is

- ``calibrated``: the evaluator's post-hoc map of the label (``calibration.json``: temperature or
  Platt scaling fitted on its threshold split; ``cxr.evaluation.calibration.apply_map``) — the default when
  the package has one, or for run dirs with ``--calibration`` or a calibration.json next to
  ``--thresholds``;
- ``operating-point``: the scale of ``cxr.evaluation.metrics.calibrate`` (0.5 is the tuned threshold; not a
  calibrated probability) — with ``--no-calibration`` or when no calibration.json is found;
- ``raw``: the model's probability (operating points 0.5, no calibration).
Files that are not images or do not decode are counted, listed in ``OUT/skipped.csv`` with the
reason, and named in the summary; nothing is skipped silently. No DICOM header field but the file
name reaches an output.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError, cli_entry
from shards.dicom import is_dicom_file
from shards.image_codec import RASTER_SUFFIXES, BadImage, source_grey


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """The image files to score, in order, and the files passed over with their reasons."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def collect_inputs(paths: Sequence[str | Path]) -> Inputs:
    """Files and folders (walked recursively, sorted) → images to read; other files are listed as skipped."""
    found = Inputs()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                _add(found, file)
        elif path.is_file():
            _add(found, path)
        else:
            raise CxrError(f"{path}: no such file or folder — pass DICOM/PNG/JPEG files or folders of them")
    if not found.images and not found.skipped:
        raise CxrError(f"{', '.join(map(str, paths))}: no files found — pass DICOM/PNG/JPEG files or folders")
    return found


def _add(found: Inputs, file: Path) -> None:
    if file.suffix.lower() in RASTER_SUFFIXES or is_dicom_file(file):
        found.images.append(file)
    else:
        found.skipped.append((file, "not an image (neither DICOM nor PNG/JPEG)"))


def read_grey(path: Path) -> np.ndarray:
    """One file → the 8-bit grey master [H, W] pack would store for it (shards.image_codec.source_grey:
    DICOM through shards.dicom, PNG by pack's grey policy, JPEG as PIL's convert('L'))."""
    try:
        return source_grey(path.read_bytes(), str(path))
    except BadImage as err:
        raise CxrError(f"{path}: {err}") from None
    except OSError as err:
        raise CxrError(f"{path}: unreadable ({err.strerror or err})") from None


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


def open_runs(runs: Sequence[Path], ood: Path | None, thresholds: str | None, method: str, device: str) -> Scorer:
    """Training run dirs (an ensemble) and an optional gate run, preprocessed as the loaders do."""
    import torch

    from cxr.evaluation.inference import ensemble_scores, member_names
    from cxr.runs.open import build_member_model, read_member
    from cxr.tools.export import operating_points

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
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
    # each member's mean/std as the evaluator normalises for it: its run's data section
    norm = {m.name: m.config.data for m in members}
    gate = None
    if ood is not None:
        from cxr.tools.ood import GateScore, load_gate, read_threshold

        ae, gate_member = load_gate(ood, device=str(dev))
        fitted = read_threshold(ood)
        gate = (
            GateScore(ae, fitted["features"]).to(dev).eval(),
            int(gate_member.resolution or 64),
            fitted["threshold"],
            gate_model_data(ae),
        )
    labels = list(members[0].labels)
    points = np.full(len(labels), 0.5)  # no tuned thresholds: calibration is the identity
    if thresholds is not None:
        ops = operating_points(thresholds, len(members), members[0].name, method)
        if ops["labels"] != labels:
            raise CxrError(
                f"{thresholds}: thresholds for another label set than the runs' — pass the "
                "thresholds.json of these runs' report (python -m cxr.evaluate --runs …)"
            )
        points = np.asarray(ops["operating_points"], float)

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


# ---------------------------------------------------------------------------------------------- predict
def predict(
    scorer: Scorer, inputs: Inputs, out: Path, batch_size: int = 16, progress: bool = True, overlays: bool = False
) -> dict:
    """Score every readable image in batches; write predictions.csv and skipped.csv (and, with
    ``overlays``, a heat-map PNG per accepted image and positive label + index.html); return the counts."""
    from cxrbase.progress import progress as progress_bar

    if overlays and scorer.heat is None:
        raise CxrError(
            f"--overlays: {scorer.description} has no class activation maps (its members are not all "
            "pooled-linear) — predict with the run dirs instead, which use Grad-CAM"
        )
    rows: list[dict[str, Any]] = []
    drawn: list[dict[str, Any]] = []
    skipped = list(inputs.skipped)
    t0 = time.perf_counter()
    bar = progress_bar(total=len(inputs.images), unit="img", desc="predict", disable=not progress)
    chunks = [inputs.images[s : s + batch_size] for s in range(0, len(inputs.images), batch_size)]
    with ThreadPoolExecutor(1, thread_name_prefix="cxr-predict-read") as reader:
        # the next batch is read and preprocessed (decoders and resize release the GIL) while this one is scored
        ahead = [reader.submit(_load, scorer, chunk) for chunk in chunks[:1]]
        for k in range(len(chunks)):
            batch, unreadable, prepared = ahead.pop().result()
            if k + 1 < len(chunks):
                ahead.append(reader.submit(_load, scorer, chunks[k + 1]))
            skipped.extend(unreadable)
            if not batch:
                bar.update(len(chunks[k]))
                continue
            probs, gate = scorer.score(prepared)
            calibrated = shown_probabilities(scorer, probs)
            for i, (path, pixels) in enumerate(batch):
                rows.append(_row(scorer, path, probs[i], calibrated[i], None if gate is None else gate[i]))
                if overlays:
                    drawn.append(_draw(scorer, out, len(rows) - 1, rows[-1], pixels, calibrated[i]))
            bar.update(len(chunks[k]))
    bar.close()
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "predictions.csv", rows, _columns(scorer))
    _write_csv(out / "skipped.csv", [{"file": str(p), "reason": r} for p, r in skipped], ["file", "reason"])
    if overlays:
        _write_overlay_index(out, scorer, drawn)
    rejected = sum(r["gate"] == "rejected" for r in rows)
    return {
        "images": len(inputs.images) + len(inputs.skipped),
        "scored": len(rows),
        "rejected": rejected,
        "skipped": skipped,
        "seconds": seconds,
    }


def _load(scorer: Scorer, paths: list[Path]) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[Path, str]], Any]:
    """One batch: (readable files with their grey masters, unreadable files with the reason, model inputs)."""
    batch: list[tuple[Path, np.ndarray]] = []
    unreadable: list[tuple[Path, str]] = []
    for path in paths:
        try:
            batch.append((path, read_grey(path)))
        except CxrError as err:
            unreadable.append((path, str(err).removeprefix(f"{path}: ")))
    return batch, unreadable, scorer.prepare([pixels for _, pixels in batch]) if batch else None


def _row(scorer: Scorer, path: Path, probs: np.ndarray, calibrated: np.ndarray, gate: float | None) -> dict:
    verdict = "none" if gate is None else ("rejected" if gate > scorer.threshold else "accepted")
    row: dict[str, Any] = {
        "file": str(path),
        "gate_score": "" if gate is None else f"{gate:.6g}",
        "gate": verdict,
        "probabilities": mapping_kind(scorer),
    }
    for j, label in enumerate(scorer.labels):
        row[label] = f"{calibrated[j]:.6f}"
    for j, label in enumerate(scorer.labels):
        row[f"{label}_decision"] = "" if verdict == "rejected" else int(probs[j] >= scorer.operating_points[j])
    for j, label in enumerate(scorer.labels):
        row[f"raw_{label}"] = f"{probs[j]:.8f}"
    return row


def _draw(scorer: Scorer, out: Path, n: int, row: dict, pixels: np.ndarray, calibrated: np.ndarray) -> dict:
    """OUT/overlays/<n>_<file stem>_<label>.png for each positive decision of an accepted image."""
    from PIL import Image

    from cxr.tools.explain import overlay

    positive = [j for j, label in enumerate(scorer.labels) if row[f"{label}_decision"] == 1]
    entry: dict[str, Any] = {"file": row["file"], "gate": row["gate"], "figures": []}
    if not positive:
        return entry
    maps = scorer.heat(pixels, positive)
    folder = out / "overlays"
    folder.mkdir(parents=True, exist_ok=True)
    for k, j in enumerate(positive):
        label = scorer.labels[j]
        name = f"{n:05d}_{Path(row['file']).stem}_{label}.png"
        empty = not float(maps[k].max()) > 0
        caption = [
            f"{Path(row['file']).name}  {label}  ({scorer.heat_method})",
            _caption(scorer, calibrated[j]) + ("   map: all zero" if empty else ""),
        ]
        overlay(Image.fromarray(pixels, "L"), maps[k], caption).save(folder / name)
        entry["figures"].append({"png": f"overlays/{name}", "label": label, "p": float(calibrated[j]), "empty": empty})
    return entry


def _write_overlay_index(out: Path, scorer: Scorer, drawn: list[dict]) -> None:
    import html

    parts = [
        "<!doctype html><meta charset=utf-8><title>cxr-predict overlays</title>"
        "<style>body{font-family:sans-serif}.row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}"
        "figcaption{font-size:13px}</style><h1>cxr-predict: where the model looked</h1>",
        f"<p>{html.escape(scorer.heat_method)}, clipped at 0 and scaled by its maximum (as cxr.tools.explain and "
        "the browser page draw it), for every finding at or above its operating point. "
        + "".join(f"<br>{html.escape(note)}" for note in scorer.heat_notes)
        + "</p>",
    ]
    for entry in drawn:
        parts.append(f"<h2>{html.escape(entry['file'])}</h2>")
        if entry["gate"] == "rejected":
            parts.append("<p>Rejected by the OOD gate: no diagnosis, no map.</p>")
        elif not entry["figures"]:
            parts.append("<p>No finding at or above its operating point.</p>")
        figs = "".join(
            f'<figure><a href="{html.escape(f["png"])}"><img src="{html.escape(f["png"])}" width="320"></a>'
            f"<figcaption>{html.escape(f['label'])}: {html.escape(_caption(scorer, f['p']))}"
            f"{' (map all zero: no positive evidence)' if f['empty'] else ''}</figcaption></figure>"
            for f in entry["figures"]
        )
        if figs:
            parts.append(f"<div class=row>{figs}</div>")
    atomic_write_text(out / "index.html", "\n".join(parts) + "\n")


def _columns(scorer: Scorer) -> list[str]:
    return [
        "file",
        "gate_score",
        "gate",
        "probabilities",
        *scorer.labels,
        *(f"{l}_decision" for l in scorer.labels),
        *(f"raw_{l}" for l in scorer.labels),
    ]


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr-predict",
        description="Predict the 14 findings for DICOM/PNG/JPEG files with trained runs or an exported package; "
        "writes OUT/predictions.csv (calibrated probabilities, decisions, the OOD gate's verdict) and "
        "OUT/skipped.csv (files that are not images or do not decode, with the reason).",
    )
    p.add_argument("inputs", nargs="+", help="files or folders (walked recursively) of DICOM, PNG or JPEG images")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="RUN_OR_PACKAGE",
        help="a training run dir (repeat --model for an ensemble: the mean of probabilities) or one "
        "package folder written by python -m cxr.tools.export",
    )
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument(
        "--ood",
        metavar="RUN",
        help="with run dirs: the OOD gate's run dir (cxr.tools.ood threshold done); a rejected image gets no decision",
    )
    p.add_argument(
        "--thresholds",
        metavar="REPORT/thresholds.json",
        help="with run dirs: the evaluator's tuned thresholds (default: operating point 0.5)",
    )
    p.add_argument("--method", default="f1", choices=("f1", "youden"), help="which tuned thresholds (default f1)")
    p.add_argument(
        "--calibration",
        metavar="REPORT/calibration.json",
        help="with run dirs: the evaluator's post-hoc maps, so the label columns are calibrated probabilities "
        "(default: the calibration.json next to --thresholds, when there is one; a package carries its own)",
    )
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="keep the uncalibrated scale: the operating-point map x/(2o) with tuned thresholds (0.5 = the "
        "threshold), else the model's probability; the 'probabilities' column says which",
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--device", default="auto", help="run dirs: auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument(
        "--overlays",
        action="store_true",
        help="also draw OUT/overlays/*.png — Grad-CAM (run dirs) or the package's CAM for every positive "
        "decision of an accepted image — and OUT/index.html",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise CxrError(f"--batch-size {args.batch_size}: use a positive number")
    inputs = collect_inputs(args.inputs)
    if args.calibration and args.no_calibration:
        raise CxrError(f"--calibration {args.calibration} with --no-calibration: choose one")
    scorer = open_model(
        args.model,
        args.ood,
        args.thresholds,
        args.method,
        args.device,
        calibration=args.calibration,
        keep_mapping=args.no_calibration,
    )
    out = Path(args.out)
    done = predict(scorer, inputs, out, args.batch_size, progress=not args.no_progress, overlays=args.overlays)
    for path, reason in done["skipped"]:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    rate = done["scored"] / done["seconds"] if done["seconds"] > 0 else float("nan")
    gate = f", {done['rejected']} rejected by the gate" if scorer.has_gate else ", no OOD gate"
    print(
        f"cxr-predict: {done['images']} files → {out / 'predictions.csv'}: {done['scored']} scored{gate}, "
        f"{len(done['skipped'])} skipped (listed in {out / 'skipped.csv'}); {rate:.1f} img/s with "
        f"{scorer.description}; label columns: {mapping_note(scorer)}"
    )
    return 0


main = cli_entry(main)

if __name__ == "__main__":
    sys.exit(main())
