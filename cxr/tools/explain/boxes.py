"""Boxes and localisation: the BBox_List_2017 parser, box scaling and masks, the per-pair
scores (hit, empty, IoU, energy, chance), their bootstrap summary and the localisation outputs
(localisation.csv, localisation_pairs.csv, localisation.md)."""

from __future__ import annotations

import argparse
import csv
import gzip
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.tools.explain.maps import EMPTY_MEANING, METHOD_NAMES
from cxrbase.atomic import atomic_write, atomic_write_text
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

BOX_SPELLINGS = {"Infiltrate": "Infiltration"}  # BBox_List_2017 spells Infiltration this way
NIH_BOX_FRAME = 1024
SCORES = ("hit", "iou", "energy")


def _label_rank(label: str) -> tuple[int, str]:
    """Sort key: the NIH labels in canonical order, then any other data set's labels by name."""
    return (LABELS.index(label), "") if label in LABELS else (len(LABELS), label)


def read_boxes(path: str | Path) -> pd.DataFrame:
    """A BBox_List_2017-layout CSV → columns key, label, x, y, w, h (source-image pixels).

    Accepts the NIH file as released (gzip or not, trailing empty columns, ``Infiltrate``
    for Infiltration) and ``shards synth``'s boxes.csv. Unknown labels, missing or
    non-positive sizes are errors naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{path}: box file not found — pass BBox_List_2017.csv.gz (NIH) or a synth boxes.csv")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        if [h.strip() for h in header[:2]] != ["Image Index", "Finding Label"]:
            raise CxrError(
                f"{path}: header {','.join(header)[:60]!r} is not the BBox_List_2017 layout "
                "(Image Index,Finding Label,Bbox [x,y,w,h]) — pass the NIH box file"
            )
        for line, fields in enumerate(reader, start=2):
            if not any(f.strip() for f in fields):
                continue
            rows.append(_box_row(path, line, fields))
    return pd.DataFrame(rows, columns=["key", "label", "x", "y", "w", "h"])


def _box_row(path: Path, line: int, fields: list[str]) -> tuple:
    values = [f.strip() for f in fields]
    if len(values) < 6 or any(values[6:]):
        raise CxrError(f"{path}:{line}: expected image, label, x, y, w, h (then only empty columns) — fix the row")
    label = BOX_SPELLINGS.get(values[1], values[1])
    if label not in LABELS:
        raise CxrError(f"{path}:{line}: unknown label {values[1]!r} — labels are {', '.join(LABELS)}")
    try:
        x, y, w, h = (float(v) for v in values[2:6])
    except ValueError as err:
        raise CxrError(f"{path}:{line}: box {values[2:6]} is not four numbers — fix the row") from err
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise CxrError(f"{path}:{line}: box {values[2:6]} needs finite x, y and w, h > 0 — fix the row")
    return Path(values[0]).stem, label, x, y, w, h


def scale_boxes(boxes: pd.DataFrame, source: tuple[float, float], target: tuple[float, float]) -> pd.DataFrame:
    """Boxes in a source frame (width, height) → the target frame (e.g. 1024² → the model's R×R)."""
    sx, sy = target[0] / source[0], target[1] / source[1]
    out = boxes.copy()
    out["x"], out["w"] = boxes["x"] * sx, boxes["w"] * sx
    out["y"], out["h"] = boxes["y"] * sy, boxes["h"] * sy
    return out


def box_mask(boxes: pd.DataFrame | Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """bool [H,W]: pixels whose centre lies in any box [x, x+w) × [y, y+h); a box that holds no centre keeps the pixel under its own centre."""
    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    rows = boxes[["x", "y", "w", "h"]].to_numpy() if isinstance(boxes, pd.DataFrame) else np.asarray(boxes)
    cx, cy = np.arange(width) + 0.5, np.arange(height) + 0.5
    for x, y, w, h in rows:
        inside = ((cy >= y) & (cy < y + h))[:, None] & ((cx >= x) & (cx < x + w))[None, :]
        if not inside.any():
            i = min(max(int(y + h / 2), 0), height - 1)
            j = min(max(int(x + w / 2), 0), width - 1)
            inside[i, j] = True
        mask |= inside
    return mask


def localisation(heat: np.ndarray, region: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Pointing-game hit, IoU of {heat ≥ threshold·max} with the region, energy inside, chance rate."""
    heat = np.asarray(heat, dtype=np.float64)
    peak = heat.max()
    chance = float(region.mean())
    if not np.isfinite(peak) or peak <= 0:  # no evidence anywhere: scored as a miss, and counted as empty
        return {"hit": 0.0, "iou": 0.0, "energy": 0.0, "chance": chance, "empty": 1}
    hot = heat >= threshold * peak
    i, j = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return {
        "hit": float(region[i, j]),
        "iou": float((hot & region).sum() / (hot | region).sum()),
        "energy": float(heat[region].sum() / heat.sum()),
        "chance": chance,
        "empty": 0,
    }


def summarise(pairs: pd.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Per run and label (+ ``all``): n, mean hit/IoU/energy with bootstrap CIs over images, chance rate.

    ``pairs``: one row per (run, key, label) with the SCORES and ``chance``; every run's
    images are resampled with the same draws per label set (``cxr.evaluation.stats.bootstrap_counts``).
    """
    from cxr.evaluation.stats import bootstrap_counts

    rows = []
    for run, part in pairs.groupby("run", sort=False):
        keys = sorted(set(part["key"]))
        position = {k: i for i, k in enumerate(keys)}
        counts = bootstrap_counts(len(keys), n_boot, seed) if n_boot else None
        groups = [(label, part[part["label"] == label]) for label in sorted(set(part["label"]), key=_label_rank)]
        for label, group in [*groups, ("all", part)]:
            weights = counts[[position[k] for k in group["key"]]] if counts is not None else None
            row = {"run": run, "label": label, "pairs": len(group), "images": group["key"].nunique()}
            if "empty" in group:
                row["empty"] = int(group["empty"].sum())
                row["empty_rate"] = row["empty"] / len(group)
            for score in (*SCORES, "chance"):
                values = group[score].to_numpy(dtype=np.float64)
                row[score] = float(values.mean())
                if weights is not None and score != "chance":
                    boot = (weights.T @ values) / np.maximum(weights.sum(axis=0), 1e-12)
                    row[f"{score}_lo"], row[f"{score}_hi"] = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
            rows.append(row)
    return pd.DataFrame(rows)


def localisation_markdown(summary: pd.DataFrame, runs: list[dict], counts: dict, args: argparse.Namespace) -> str:
    """localisation.md: what was scored, then the overall table across runs and the per-label table."""

    def ci(row, score):
        lo, hi = row.get(f"{score}_lo"), row.get(f"{score}_hi")
        return f"{row[score]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and np.isfinite(lo) else "")

    res = {r["run"]: r["resolution"] for r in runs}
    layer = {r["run"]: _layer_cell(r) for r in runs}

    def empty(row):
        return f"{int(row['empty'])} ({row['empty_rate']:.3f})"

    lines = [
        f"# Localisation ({METHOD_NAMES[args.method]}) on split `{args.split}`",
        "",
        f"Boxes: `{args.bbox}`. Scored {counts['scored_images']} of the split's {counts['split_images']} "
        f"images ({counts['scored_pairs']} image-label pairs): those with a box; "
        f"{counts['boxed_elsewhere']} boxed images of the file are not in this split.",
        f"hit: the map's peak inside the label's box(es) (pointing game); IoU: {{map ≥ {args.threshold:g}·max}} "
        "vs the boxes; energy: the map's share inside the boxes; chance: box area / image area "
        f"(the hit rate of a random peak). 95 % CIs: {args.bootstrap} bootstrap resamples over images.",
        (
            f"empty: maps that are zero everywhere ({EMPTY_MEANING}); they are scored as misses "
            "(hit, IoU and energy 0), so a high empty rate means the model gave no evidence, "
            "not that it looked elsewhere."
        ),
        "",
        "| run | resolution | layer (map) | pairs | hit | IoU | energy | chance | empty |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    overall = summary[summary["label"] == "all"]
    for _, row in overall.iterrows():
        lines.append(
            f"| {row['run']} | {res[row['run']]} | {layer[row['run']]} | {row['pairs']} | {ci(row, 'hit')} | "
            f"{ci(row, 'iou')} | {ci(row, 'energy')} | {row['chance']:.3f} | {empty(row)} |"
        )
    lines += [
        "",
        "## Per label",
        "",
        "| run | label | pairs | hit | IoU | energy | chance | empty |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, row in summary[summary["label"] != "all"].iterrows():
        lines.append(
            f"| {row['run']} | {row['label']} | {row['pairs']} | {ci(row, 'hit')} | {ci(row, 'iou')} | "
            f"{ci(row, 'energy')} | {row['chance']:.3f} | {empty(row)} |"
        )
    return "\n".join(lines) + "\n"


def _layer_cell(run: dict) -> str:
    return f"{run['layer']} ({run['map']})" if run.get("layer") else str(run.get("map", ""))


def format_runs_table(summary: pd.DataFrame, runs: list[dict]) -> str:
    """The across-runs table for the terminal: overall hit/IoU/energy per run, by resolution."""
    res = {r["run"]: r["resolution"] for r in runs}
    overall = summary[summary["label"] == "all"].copy()
    overall["resolution"] = overall["run"].map(res)
    maps = {r["run"]: r.get("map", "") for r in runs}
    head = (
        f"{'run':<20} {'res':>5} {'map':>7} {'pairs':>6} {'hit':>22} {'IoU':>22} {'energy':>22} {'chance':>7} "
        f"{'empty':>13}"
    )
    lines = [head]
    for _, r in overall.sort_values("resolution").iterrows():
        cells = [f"{r[s]:.3f} [{r.get(s + '_lo', np.nan):.3f},{r.get(s + '_hi', np.nan):.3f}]" for s in SCORES]
        empty = f"{int(r['empty'])} ({r['empty_rate']:.3f})"
        lines.append(
            f"{str(r['run'])[:20]:<20} {r['resolution']:>5} {maps[r['run']]:>7} {r['pairs']:>6} "
            f"{cells[0]:>22} {cells[1]:>22} {cells[2]:>22} {r['chance']:>7.3f} {empty:>13}"
        )
    lines.append(f"empty: maps zero everywhere ({EMPTY_MEANING}), scored as misses")
    return "\n".join(lines)


def write_localisation(
    out: Path, pairs: pd.DataFrame, runs: list[dict], counts: dict, args: argparse.Namespace
) -> pd.DataFrame:
    summary = summarise(pairs, args.bootstrap, args.seed, args.alpha)
    summary.insert(1, "resolution", summary["run"].map({r["run"]: r["resolution"] for r in runs}))
    summary.insert(2, "method", args.method)
    with atomic_write(out / "localisation.csv", "w") as fh:
        summary.to_csv(fh, index=False)
    with atomic_write(out / "localisation_pairs.csv", "w") as fh:
        pairs.to_csv(fh, index=False)
    atomic_write_text(out / "localisation.md", localisation_markdown(summary, runs, counts, args))
    return summary
