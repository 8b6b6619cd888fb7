"""The prediction tables: ``REPORT/predictions.parquet`` (+ ``members.json``) and ``RUN/val_predictions.parquet``.

This module is their one owner: the columns, building the frame, writing (atomically),
reading back and validating the values. ``python -m cxr.evaluate``, ``cxr.tools.ablation``,
``bench/evaluate.py`` and ``cxr/train.py`` write through it; ``--from-predictions`` of the
evaluator and of the ablation read through it.

predictions.parquet is long: one row per (split, member, key) with one probability column
per label (the shards' label names: the 14 NIH ones or a generic table's, float64) and the
ground-truth columns ``true_<Label>`` (0/1, uint8; float with NaN where the shards do not know a label); the ensemble is member ``ensemble``; then, when
the split's splits table was at hand, its per-image columns ``meta_<column>`` (``meta_patient``,
``meta_age``, ``meta_sex``, ``meta_view``, ``meta_followup`` …: subgroups and patient-level
resampling, cxr.evaluation.subgroups).
members.json beside it holds the members' run-config summaries (a JSON list).

val_predictions.parquet (a training run's best epoch): ``key`` then one float column per
label, named by the label (or ``"0"``, ``"1"``… when the model's outputs are not labels,
e.g. an ood_ae run's one score); no ground truth.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.evaluation.scores import ScoreSet
from cxr.evaluation.subgroups import META_PREFIX
from cxrbase.atomic import atomic_write, atomic_write_text
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

PREDICTIONS_FILE, MEMBERS_FILE, VAL_PREDICTIONS_FILE = "predictions.parquet", "members.json", "val_predictions.parquet"
TRUE_PREFIX = "true_"  # ground-truth columns in predictions.parquet: true_<Label> (0/1)
PREDICTION_COLUMNS = ["key", "split", "member", *LABELS, *(TRUE_PREFIX + label for label in LABELS)]  # NIH shards


def prediction_columns(labels: Sequence[str]) -> list[str]:
    """The columns of predictions.parquet for a label set (PREDICTION_COLUMNS for the 14 NIH labels)."""
    return ["key", "split", "member", *labels, *(TRUE_PREFIX + label for label in labels)]


# ------------------------------------------------------------------- build ---


def predictions_frame(per_split: dict[str, ScoreSet]) -> pd.DataFrame:
    """The long table of predictions.parquet: one row per (split, member, key)."""
    frames = []
    for split, s in per_split.items():
        y = np.asarray(s.y_true)
        # uint8 0/1; float with NaN (= unknown, masked) only when the shards hold unknown labels
        y = y.astype(np.float32) if y.dtype.kind == "f" and np.isnan(y).any() else y.astype(np.uint8)
        truth = pd.DataFrame(y, columns=[TRUE_PREFIX + c for c in s.labels])
        if s.meta is not None:  # the subgroup columns (cxr.evaluation.subgroups), so a re-analysis needs no table
            meta = s.meta.reset_index(drop=True).add_prefix(META_PREFIX)
            truth = pd.concat([truth, meta], axis=1)
        for member, probs in s.scores.items():
            frame = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(s.labels))
            frame.insert(0, "member", member)
            frame.insert(0, "split", split)
            frame.insert(0, "key", s.keys.astype(str))
            frames.append(pd.concat([frame, truth], axis=1))
    frame = pd.concat(frames, ignore_index=True)
    meta_columns = [c for c in frame.columns if str(c).startswith(META_PREFIX)]
    return frame[prediction_columns(next(iter(per_split.values())).labels) + meta_columns]


# ---------------------------------------------------------------- validate ---


def check_values(
    where: str, split: str, member: str, keys: np.ndarray, values: np.ndarray, kind: str, labels: Sequence[str] = LABELS
) -> None:
    """Raise naming ``where``, split, member, first key and label when ``values`` [N, L] hold a
    NaN/inf or a value outside [0, 1] (kind="score") or other than 0/1 (kind="label")."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if kind == "label":  # 0/1, or NaN for an unknown (masked) label
        bad = ~np.isnan(values) & (values != 0) & (values != 1)
    if not bad.any():
        return
    row, col = (int(i) for i in np.argwhere(bad)[0])
    what = "scores must be probabilities in [0, 1]" if kind == "score" else "labels must be 0 or 1"
    fix = (
        "check the model outputs (a diverged member gives NaN)"
        if kind == "score"
        else "the ground truth comes from the shards' labels; re-run the evaluation"
    )
    raise CxrError(
        f"{where}: split {split!r}, member {member!r}: {int(bad.sum())} bad values, first at key "
        f"{keys[row]!r} label {labels[col]} = {float(values[row, col]):g} ({what}) — {fix}"
    )


def check_score_sets(per_split: dict[str, ScoreSet], where: str) -> None:
    """Every score a probability and every label 0/1, before anything is written (see check_values)."""
    for split, s in per_split.items():
        check_values(where, split, "(ground truth)", s.keys, s.y_true, "label", s.labels)
        for member, probs in s.scores.items():
            check_values(where, split, member, s.keys, probs, "score", s.labels)


# ------------------------------------------------------------ write / read ---


def write_predictions(out: Path, per_split: dict[str, ScoreSet], infos: list[dict[str, Any]] | None = None) -> None:
    """OUT/predictions.parquet (all splits, members and ensemble) and, given ``infos``, OUT/members.json,
    atomically."""
    frame = predictions_frame(per_split)
    with atomic_write(Path(out) / PREDICTIONS_FILE, "wb") as fh:
        frame.to_parquet(fh, index=False)
    if infos is not None:
        atomic_write_text(Path(out) / MEMBERS_FILE, json.dumps(infos, indent=2, default=str) + "\n")


def read_members(predictions: Path) -> list[dict[str, Any]]:
    """The members.json beside a predictions.parquet ([] when there is none)."""
    path = Path(predictions).parent / MEMBERS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def read_predictions(path: Path) -> dict[str, ScoreSet]:
    """predictions.parquet → {split: ScoreSet} with members in file order, aligned by key."""
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 — pyarrow raises several types for a bad file
        raise CxrError(
            f"{path}: unreadable predictions ({err}) — pass a predictions.parquet written by `python -m cxr.evaluate`"
        ) from err
    labels = [c[len(TRUE_PREFIX) :] for c in frame.columns if str(c).startswith(TRUE_PREFIX)]
    missing = [c for c in prediction_columns(labels or LABELS) if c not in frame.columns]
    if missing:
        raise CxrError(f"{path}: missing columns {missing[:4]} — not a cxr.evaluate predictions file")
    out: dict[str, ScoreSet] = {}
    for split, part in frame.groupby("split", sort=False):
        members = list(dict.fromkeys(part["member"]))
        first = part[part["member"] == members[0]].sort_values("key")
        keys = first["key"].to_numpy(dtype=object)
        scores = {}
        for member in members:
            rows = part[part["member"] == member].sort_values("key")
            if not np.array_equal(rows["key"].to_numpy(dtype=object), keys):
                raise CxrError(
                    f"{path}: split {split!r}: member {member!r} has a different key set "
                    f"than {members[0]!r} — the file was edited or merged wrongly"
                )
            scores[member] = rows[labels].to_numpy(dtype=np.float64)
            check_values(str(path), str(split), member, keys, scores[member], "score", labels)
            check_values(
                str(path),
                str(split),
                member,
                keys,
                rows[[TRUE_PREFIX + c for c in labels]].to_numpy(dtype=np.float64),
                "label",
                labels,
            )
        y_true = first[[TRUE_PREFIX + c for c in labels]].to_numpy(dtype=np.float64)
        y_true = y_true.astype(np.float32) if np.isnan(y_true).any() else y_true.astype(np.uint8)  # NaN: unknown
        meta_columns = [c for c in part.columns if str(c).startswith(META_PREFIX) and first[c].notna().any()]
        meta = (
            first[meta_columns].rename(columns=lambda c: c[len(META_PREFIX) :]).reset_index(drop=True)
            if meta_columns
            else None
        )
        out[str(split)] = ScoreSet(keys=keys, y_true=y_true, scores=scores, labels=tuple(labels), meta=meta)
    return out


def write_val_predictions(run_dir: Path, keys: Sequence[str], probs: np.ndarray, labels: Sequence[str]) -> Path:
    """RUN/val_predictions.parquet atomically: ``key`` + one column per label, or ``"0"``, ``"1"``…
    when ``probs`` [N, C] has not one column per label (an ood_ae run's one score)."""
    columns = list(labels) if probs.shape[1] == len(labels) else None
    frame = pd.DataFrame(probs, columns=columns)
    frame.columns = [str(c) for c in frame.columns]
    frame.insert(0, "key", keys)
    path = Path(run_dir) / VAL_PREDICTIONS_FILE
    with atomic_write(path) as fh:
        frame.to_parquet(fh, index=False)
    return path
