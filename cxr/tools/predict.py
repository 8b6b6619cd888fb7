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
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cxr.tools.predict_inputs import Inputs, collect_inputs, read_grey
from cxr.tools.predict_models import (  # noqa: F401  (open_package, model_input: imported from here by bench/predict.py)
    Scorer,
    _caption,
    mapping_kind,
    mapping_note,
    model_input,
    open_model,
    open_package,
    shown_probabilities,
)
from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError, cli_entry


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
