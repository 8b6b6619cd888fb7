"""Tuned thresholds and the threshold metrics table (metrics.csv, thresholds.json).

Thresholds are tuned on the tuning split (F1/Youden optima and fixed sensitivity/specificity
targets); every proportion gets a Wilson interval, the focus score set's F1 a bootstrap one."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.evaluation.scores import ScoreSet
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

TARGETS = {"sens90": ("sensitivity", 0.90), "sens95": ("sensitivity", 0.95), "spec90": ("specificity", 0.90)}
THRESHOLD_SETS = ("0.5", "f1", "youden", *TARGETS)
METRIC_COLUMNS = ("sensitivity", "specificity", "ppv", "npv", "f1")
# each proportion's (successes, trials) in confusion counts: its Wilson interval
_PROPORTIONS = {
    "sensitivity": ("tp", ("tp", "fn")),
    "specificity": ("tn", ("tn", "fp")),
    "ppv": ("tp", ("tp", "fp")),
    "npv": ("tn", ("tn", "fn")),
}


class Notes:
    """Collect metric warnings (undefined labels, zero denominators) once each, in order."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def run(self, fn, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(*args, **kwargs)
        for w in caught:
            text = str(w.message)
            if text not in self.items:
                self.items.append(text)
        return out


def tune_all(tuning: ScoreSet, members: Sequence[str], notes: Notes | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{member: {"f1": [L], "youden": [L], "sens90": [L], "sens95": [L], "spec90": [L]}} thresholds
    tuned on the ``tuning`` split (F1/Youden optima and the fixed sensitivity/specificity targets)."""
    from cxr.evaluation.metrics import threshold_for_target, tune_thresholds

    notes = notes or Notes()
    missing = [m for m in members if m not in tuning.scores]
    if missing:
        raise CxrError(
            f"thresholds split: no predictions for members {missing} — infer the "
            "tuning split with the same members (or pass --thresholds-from none)"
        )
    return {
        m: {
            **{
                method: notes.run(tune_thresholds, tuning.y_true, tuning.scores[m], method)
                for method in ("f1", "youden")
            },
            **{
                name: notes.run(threshold_for_target, tuning.y_true, tuning.scores[m], metric, target)
                for name, (metric, target) in TARGETS.items()
            },
        }
        for m in members
    }


def metrics_table(
    scores: ScoreSet,
    tuned: dict[str, dict[str, np.ndarray]] | None,
    notes: Notes | None = None,
    alpha: float = 0.05,
    resamples: Any = None,
    focus: str | None = None,
) -> pd.DataFrame:
    """Threshold metrics per member × threshold set (0.5, f1, youden, sens90, sens95, spec90) ×
    label, macro, micro.

    Columns: member, thresholds, label, threshold, sensitivity, specificity, ppv, npv,
    f1, tp, fp, tn, fn, hamming_loss, exact_match (the last two are whole-matrix
    numbers, given on the macro and micro rows), then ``<metric>_low`` / ``<metric>_high``:
    Wilson intervals (level 1 − alpha) of sensitivity, specificity, PPV and NPV on the
    per-label and micro counts, and for ``focus`` (given ``resamples``) a percentile-bootstrap
    interval of F1 on the same resamples as the AUROC CIs (F1 is not a binomial proportion).
    """
    from cxr.evaluation.metrics import threshold_metrics

    notes = notes or Notes()
    rows = []
    for member, probs in scores.scores.items():
        sets = {"0.5": np.full(len(scores.labels), 0.5)}
        if tuned:
            sets.update(tuned[member])
        for set_name, thr in sets.items():
            tm = notes.run(threshold_metrics, scores.y_true, probs, thr)
            for c, label in enumerate(scores.labels):
                rows.append(
                    {
                        "member": member,
                        "thresholds": set_name,
                        "label": label,
                        "threshold": float(thr[c]),
                        **{k: float(tm[k][c]) for k in METRIC_COLUMNS},
                        **{k: int(tm[k][c]) for k in ("tp", "fp", "tn", "fn")},
                    }
                )
            for avg in ("macro", "micro"):
                rows.append(
                    {
                        "member": member,
                        "thresholds": set_name,
                        "label": avg,
                        **tm[avg],
                        "hamming_loss": tm["hamming_loss"],
                        "exact_match": tm["exact_match"],
                    }
                )
    columns = [
        "member",
        "thresholds",
        "label",
        "threshold",
        *METRIC_COLUMNS,
        "tp",
        "fp",
        "tn",
        "fn",
        "hamming_loss",
        "exact_match",
    ]
    table = pd.DataFrame(rows).reindex(columns=columns)
    table = table.astype({k: "Int64" for k in ("tp", "fp", "tn", "fn")})
    return _with_intervals(table, scores, tuned, alpha, resamples, focus)


def _with_intervals(
    table: pd.DataFrame,
    scores: ScoreSet,
    tuned: dict[str, dict[str, np.ndarray]] | None,
    alpha: float,
    resamples: Any,
    focus: str | None,
) -> pd.DataFrame:
    """metrics_table's ``*_low`` / ``*_high`` columns (see there)."""
    from cxr.evaluation.metrics import wilson_interval

    counts = {k: table[k].astype("float64").to_numpy().copy() for k in ("tp", "fp", "tn", "fn")}
    # micro rows: the counts summed over the labels of the same member and threshold set
    per_label = ~table["label"].isin(["macro", "micro"])
    sums = table[per_label].groupby(["member", "thresholds"], sort=False)[["tp", "fp", "tn", "fn"]].sum()
    for i in np.flatnonzero((table["label"] == "micro").to_numpy()):
        key = (table["member"].iat[i], table["thresholds"].iat[i])
        for k in counts:
            counts[k][i] = float(sums.loc[key, k])
    for name, (hit, over) in _PROPORTIONS.items():
        low, high = wilson_interval(counts[hit], counts[over[0]] + counts[over[1]], alpha)
        table[f"{name}_low"], table[f"{name}_high"] = low, high  # NaN on macro rows (no counts)
    table["f1_low"] = table["f1_high"] = np.nan
    if resamples is None or focus not in scores.scores:
        return table
    known = ~np.isnan(np.asarray(scores.y_true, dtype=np.float64))
    y = np.asarray(scores.y_true, dtype=np.float64) == 1
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    sets = {"0.5": np.full(len(scores.labels), 0.5), **((tuned or {}).get(focus) or {})}
    where = {key: i for i, key in enumerate(zip(table["member"], table["thresholds"], table["label"]))}
    interval = np.full((len(table), 2), np.nan)
    for set_name, thr in sets.items():
        pred = scores.scores[focus] >= thr
        sums = resamples.sums(np.column_stack([pred & y, pred & ~y & known, ~pred & y]))  # [B, 3L]: tp, fp, fn
        L = len(scores.labels)
        tp, fp, fn = sums[:, :L], sums[:, L : 2 * L], sums[:, 2 * L :]
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * tp / (2 * tp + fp + fn)
            micro = 2 * tp.sum(1) / (2 * tp.sum(1) + fp.sum(1) + fn.sum(1))
        for c, label in enumerate([*scores.labels, "micro"]):
            samples = micro if label == "micro" else f1[:, c]
            if np.isfinite(samples).any():
                interval[where[(focus, set_name, label)]] = np.nanpercentile(samples, q)
    table["f1_low"], table["f1_high"] = interval[:, 0], interval[:, 1]
    return table


def thresholds_document(
    tuned: dict[str, dict[str, np.ndarray]], split: str, n: int, labels: Sequence[str] = LABELS
) -> dict[str, Any]:
    """The thresholds.json document: per member, per method, per label."""
    return {
        "tuned_on": split,
        "n_images": n,
        "rule": "predict positive when probability >= threshold",
        "methods": {
            "f1": "maximises F1 per label",
            "youden": "maximises TPR - FPR per label",
            "sens90": "highest threshold with sensitivity >= 0.90",
            "sens95": "highest threshold with sensitivity >= 0.95",
            "spec90": "lowest threshold with specificity >= 0.90",
        },
        "members": {
            m: {method: dict(zip(labels, map(float, thr))) for method, thr in by.items()} for m, by in tuned.items()
        },
    }


def read_thresholds(path: str | Path) -> dict[str, Any]:
    """A thresholds.json written by :func:`write_outputs` (the document of :func:`thresholds_document`)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CxrError(
            f"{path}: unreadable thresholds ({err}) — pass the evaluator's REPORT/thresholds.json "
            f"(python -m cxr.evaluate --runs ... --out REPORT)"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("members"), dict):
        raise CxrError(
            f'{path}: not an evaluator thresholds.json (no "members") — pass REPORT/thresholds.json '
            f"written by python -m cxr.evaluate"
        )
    return doc
