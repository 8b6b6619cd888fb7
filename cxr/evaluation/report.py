"""The evaluation's numbers, tables, figures and report.md, from scores already inferred.

Input: a :class:`ScoreSet` per split (keys, 0/1 truth and each member's and the
ensemble's probabilities). :func:`analyse` computes, with ``cxr.evaluation.metrics``:

- ``aucs`` — per member and label (+ ``mean``): AUROC with a percentile-bootstrap CI
  (all score sets share the same resamples), AUPRC, prevalence, positives, images;
- ``thresholds`` — per member and label, the F1- and Youden-optimal thresholds on the
  tuning split (normally ``val``);
- ``metrics`` — sensitivity, specificity, PPV, NPV, F1 per label and macro/micro,
  Hamming loss and exact match, at 0.5, at the tuned thresholds and at the thresholds
  reaching sensitivity 0.90 / 0.95 and specificity 0.90 on the tuning split, with Wilson
  intervals (and a bootstrap F1 interval for the ensemble);
- ``calibration`` — ECE (equal width and equal mass), Brier and its decomposition, before and
  after temperature / Platt maps fitted on the tuning split (cxr.evaluation.calibration), with
  bootstrap CIs for the ensemble;
- ``subgroups`` — per grouping of the split's table (sex, age bands, view, follow-up, …):
  AUROC with CIs, gaps to the largest group with CIs and unpaired DeLong + Holm, and the
  under-diagnosis rate (cxr.evaluation.subgroups).

Every CI uses the same resamples (``cxr.evaluation.metrics.Resamples``): whole patients when the split
knows them (``ScoreSet.meta["patient"]``), else images.

:func:`write_outputs` writes aucs.csv, thresholds.json, metrics.csv, calibration.csv,
calibration.json, subgroups.csv, roc.png, pr.png, reliability.png and report.md atomically.
Nothing here loads models.
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrbase.atomic import atomic_write, atomic_write_text
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

ENSEMBLE = "ensemble"
MEAN = "mean"
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


@dataclass
class ScoreSet:
    """Scores of one split: keys [N], truth y_true [N, L] 0/1 (float NaN where a label is unknown:
    every analysis uses, per label, the images that know it), scores {member: [N, L] probabilities}."""

    keys: np.ndarray
    y_true: np.ndarray
    scores: dict[str, np.ndarray]
    duplicates: int = 0
    labels: tuple[str, ...] = LABELS  # the L column names (the shards' labels)
    meta: pd.DataFrame | None = (
        None  # per-image columns for subgroups and patient resampling (cxr.evaluation.subgroups)
    )

    @property
    def n(self) -> int:
        """Number of images."""
        return int(len(self.keys))

    def deduplicated(self) -> ScoreSet:
        """Sorted by key with repeated keys dropped (first kept), the drop counted in ``duplicates``."""
        keys = np.asarray(self.keys, dtype=object).astype(str)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]] if keys.size else np.zeros(0, bool)
        keep = order[first]
        return ScoreSet(
            keys=keys[keep].astype(object),
            y_true=self.y_true[keep],
            scores={k: v[keep] for k, v in self.scores.items()},
            duplicates=self.duplicates + int(keys.size - keep.size),
            labels=self.labels,
            meta=None if self.meta is None else self.meta.iloc[keep].reset_index(drop=True),
        )


@dataclass
class Analysis:
    """Everything computed from the scores: the three tables and the tuned thresholds."""

    aucs: pd.DataFrame
    metrics: pd.DataFrame
    thresholds: dict[str, Any]
    tuned: dict[str, dict[str, np.ndarray]]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: pd.DataFrame | None = None  # calibration.csv (see calibration_table)
    calibration_doc: dict[str, Any] | None = None  # calibration.json of the focus score set
    subgroups: pd.DataFrame | None = None  # subgroups.csv (see cxr.evaluation.subgroups.subgroup_table)
    resampling: str = "image"  # the bootstrap's unit: "patient" or "image"
    n_units: int = 0  # patients (or images) the bootstrap draws from
    calibrated: np.ndarray | None = None  # the focus score set's calibrated probabilities [N, L]


# ------------------------------------------------------------------ analysis ---


class _Notes:
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


FEW_POSITIVES = 10  # labels with fewer positives than this are flagged in aucs.csv and report.md


def auc_table(
    scores: ScoreSet,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    notes: _Notes | None = None,
    progress: bool = True,
    counts: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per member and label (+ ``mean``): auroc, ci_low, ci_high, auprc, prevalence, n_pos, n.

    The CIs are percentile-bootstrap intervals at level 1 − alpha over images; every
    member and the ensemble use the same resamples (``cxr.evaluation.metrics.bootstrap_counts``
    with ``seed``, or the given ``counts`` [N, n_boot], e.g. patient-level
    ``cxr.evaluation.metrics.Resamples.counts``). ``n_boot=0`` leaves the CI columns NaN.
    """
    from cxr.evaluation.metrics import bootstrap_auroc, bootstrap_counts, per_label_auprc, per_label_auroc
    from cxrbase.progress import progress as progress_bar

    notes = notes or _Notes()
    y, names = scores.y_true, list(scores.scores)
    if counts is None and n_boot > 0:
        counts = bootstrap_counts(scores.n, n_boot, seed)
    boots = []
    for m in progress_bar(names, desc=f"AUROC + {n_boot} bootstrap CIs", unit="score set", disable=not progress):
        if counts is not None:  # one resample matrix for all: paired CIs
            boots.append(notes.run(bootstrap_auroc, y, scores.scores[m], alpha=alpha, counts=counts))
        else:
            boots.append(_point_only(notes.run(per_label_auroc, y, scores.scores[m])))
    known = ~np.isnan(np.asarray(y, dtype=np.float64))
    n_pos, n_known = np.nansum(y, axis=0).astype(np.int64), known.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        prevalence = n_pos / n_known  # over the images that know the label
    rows = []
    for member, boot in zip(names, boots):
        auprc = notes.run(per_label_auprc, y, scores.scores[member])
        valid = boot.get("n_valid_labels", np.zeros(len(scores.labels), int))
        for c, label in enumerate(scores.labels):
            rows.append(
                (
                    member,
                    label,
                    boot["auroc"][c],
                    boot["ci_low"][c],
                    boot["ci_high"][c],
                    auprc[c],
                    prevalence[c],
                    int(n_pos[c]),
                    int(n_known[c]),
                    int(valid[c]),
                    n_boot,
                    bool(n_pos[c] < FEW_POSITIVES),
                )
            )
        rows.append(
            (
                member,
                MEAN,
                boot["mean_auroc"],
                boot["mean_ci_low"],
                boot["mean_ci_high"],
                _nanmean(auprc),
                _nanmean(prevalence),
                int(n_pos.sum()),
                scores.n,
                int(boot.get("n_valid", 0)),
                n_boot,
                bool((n_pos < FEW_POSITIVES).any()),
            )
        )
    # n_valid: resamples (of n_boot) in which the AUROC is defined; few_positives: < FEW_POSITIVES
    # positives in this split (the mean row: any label has), so the CI rests on very few images
    return pd.DataFrame(
        rows,
        columns=[
            "member",
            "label",
            "auroc",
            "ci_low",
            "ci_high",
            "auprc",
            "prevalence",
            "n_pos",
            "n",
            "n_valid",
            "n_boot",
            "few_positives",
        ],
    )


def _point_only(auroc: np.ndarray) -> dict[str, Any]:
    nan = np.full_like(auroc, np.nan)
    return {
        "auroc": auroc,
        "ci_low": nan,
        "ci_high": nan,
        "mean_auroc": _nanmean(auroc),
        "mean_ci_low": math.nan,
        "mean_ci_high": math.nan,
    }


def _nanmean(x: np.ndarray) -> float:
    finite = np.asarray(x, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else math.nan


def tune_all(tuning: ScoreSet, members: Sequence[str], notes: _Notes | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{member: {"f1": [L], "youden": [L], "sens90": [L], "sens95": [L], "spec90": [L]}} thresholds
    tuned on the ``tuning`` split (F1/Youden optima and the fixed sensitivity/specificity targets)."""
    from cxr.evaluation.metrics import threshold_for_target, tune_thresholds

    notes = notes or _Notes()
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
    notes: _Notes | None = None,
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

    notes = notes or _Notes()
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


CALIBRATION_METRICS = ("ece_width", "ece_mass", "brier", "reliability", "resolution", "uncertainty", "logloss")
CALIBRATION_CI = ("ece_width", "ece_mass", "brier")  # bootstrapped for the focus score set
VARIANTS = ("raw", "temperature", "platt", "calibrated")  # calibrated: each label's chosen map


def focus_member(scores: ScoreSet) -> str:
    """The score set the report centres on: the ensemble, else the last member."""
    return ENSEMBLE if ENSEMBLE in scores.scores else list(scores.scores)[-1]


def _calibration_rows(y: np.ndarray, p: np.ndarray, labels: Sequence[str]) -> dict[str, np.ndarray]:
    from cxr.evaluation import calibration as cal

    out = {
        "ece_width": cal.ece(y, p, strategy="width"),
        "ece_mass": cal.ece(y, p, strategy="mass"),
        "brier": cal.brier(y, p),
        **cal.brier_decomposition(y, p),
        "logloss": cal.log_loss(y, p),
    }
    return out


def _calibration_samples(y: np.ndarray, p: np.ndarray, resamples: Any) -> dict[str, np.ndarray]:
    """[B, L] bootstrap samples of ECE (both binnings) and Brier on ``resamples``; the bins' edges
    are those of the full split (equal-mass edges are not re-estimated per resample)."""
    from cxr.evaluation import calibration as cal

    n, L = y.shape
    known = ~np.isnan(y)  # unknown labels: weight 0, and each label's total counts its known images
    total = resamples.sums(known.astype(np.float64))  # [B, L] known images drawn per resample
    gaps = np.empty((total.shape[0], L, 2))
    # one label × binning at a time: [n, N_BINS] of scratch, not all 2·L·N_BINS columns at once
    # (~2.4 kB an image in float64, 1 GB at NIH size — bench/scale.py)
    for c in range(L):
        k = known[:, c]
        for s, strategy in enumerate(("width", "mass")):
            block = np.zeros((n, cal.N_BINS))
            if k.any():
                idx = cal.bin_index(p[k, c], cal.bin_edges(p[k, c], cal.N_BINS, strategy), strategy)
                block[np.flatnonzero(k), idx] = y[k, c] - p[k, c]
            with np.errstate(invalid="ignore", divide="ignore"):
                gaps[:, c, s] = np.abs(resamples.sums(block)).sum(axis=1) / total[:, c]
    squared = np.where(known, (p - np.nan_to_num(y)) ** 2, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        brier = resamples.sums(squared) / total
    return {"ece_width": gaps[:, :, 0], "ece_mass": gaps[:, :, 1], "brier": brier}


def calibration_table(
    scores: ScoreSet,
    tuning: ScoreSet | None,
    *,
    tuning_split: str | None,
    resamples: Any = None,
    alpha: float = 0.05,
    seed: int = 0,
    fitted: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any] | None, np.ndarray | None]:
    """Calibration per member × variant × label (+ ``mean``): ECE (equal width, equal mass),
    Brier with reliability/resolution/uncertainty and log-loss; for the focus score set
    ``*_low``/``*_high`` bootstrap CIs of ECE and Brier (raw and calibrated).

    Variants: ``raw`` for every score set; for the ``fitted`` ones (default: the focus) with a
    tuning split also ``temperature`` and ``platt`` (every label scaled so) and ``calibrated``
    (each label's map chosen on the tuning split, cxr.evaluation.calibration). AUROC is the same for every
    variant (the maps are strictly increasing), so it is not repeated here. Returns (table, the
    focus's calibration.json document or None, the focus's calibrated probabilities or None).
    """
    from cxr.evaluation import calibration as cal

    focus = focus_member(scores)
    labels = list(scores.labels)
    y = scores.y_true.astype(np.float64)
    groups = None
    if tuning is not None and tuning.meta is not None and "patient" in tuning.meta:
        groups = tuning.meta["patient"].to_numpy()
    rows, document, calibrated = [], None, None
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    for member, probs in scores.scores.items():
        variants = {"raw": probs}
        if tuning is not None and member in tuning.scores and member in (fitted or [focus]):
            maps = cal.fit_calibration(tuning.y_true, tuning.scores[member], labels, groups, seed=seed)
            variants.update({m: cal.apply_calibration(probs, maps, labels, m) for m in ("temperature", "platt")})
            variants["calibrated"] = cal.apply_calibration(probs, maps, labels)
            if member == focus:
                document = cal.calibration_document(maps, member, tuning_split or "", tuning.n)
                calibrated = variants["calibrated"]
        for variant, p in variants.items():
            values = _calibration_rows(y, p, labels)
            samples = (
                _calibration_samples(y, p, resamples)
                if resamples is not None and member == focus and variant in ("raw", "calibrated")
                else None
            )
            for c, label in enumerate([*labels, MEAN]):
                row = {"member": member, "variant": variant, "label": label}
                for k, v in values.items():
                    row[k] = float(v[c]) if label != MEAN else _nanmean(v)
                if label != MEAN:
                    entry = (document or {}).get("labels", {}).get(label, {}) if member == focus else {}
                    row["method"] = entry.get("method") if variant == "calibrated" else None
                if samples is not None:
                    for k in CALIBRATION_CI:
                        column = samples[k][:, c] if label != MEAN else np.nanmean(samples[k], axis=1)
                        row[f"{k}_low"], row[f"{k}_high"] = np.nanpercentile(column, q)
                rows.append(row)
    columns = [
        "member",
        "variant",
        "label",
        "method",
        *CALIBRATION_METRICS,
        *(f"{k}_{e}" for k in CALIBRATION_CI for e in ("low", "high")),
    ]
    return pd.DataFrame(rows).reindex(columns=columns), document, calibrated


def make_resamples(scores: ScoreSet, n_boot: int, seed: int, level: str = "patient") -> Any:
    """The split's bootstrap resamples: over patients when ``level`` is "patient" and the split
    knows its patients (``meta["patient"]``), else over images; None for n_boot = 0."""
    from cxr.evaluation.metrics import Resamples

    if n_boot <= 0:
        return None
    patients = (
        scores.meta["patient"].to_numpy()
        if (
            level == "patient"
            and scores.meta is not None
            and "patient" in scores.meta
            and scores.meta["patient"].notna().all()
        )
        else None
    )
    return Resamples(scores.n, n_boot, seed, patients)


def analyse(
    scores: ScoreSet,
    tuning: ScoreSet | None,
    *,
    tuning_split: str | None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    resample: str = "patient",
    subgroups: Sequence[str] | None = None,
    calibrate: bool = True,
) -> Analysis:
    """All numbers of the report: AUROC/CI/AUPRC table, tuned thresholds, threshold metrics with
    intervals, calibration (before/after post-hoc maps fitted on the tuning split) and subgroups.

    resample: "patient" (the default; falls back to images when the split has no patient
    column) or "image". subgroups: grouping specs (cxr.evaluation.subgroups; None: the defaults, [] none).
    """
    from cxr.evaluation.subgroups import DEFAULT_GROUPINGS, subgroup_table

    notes, seconds = _Notes(), {}
    t0 = time.perf_counter()
    resamples = make_resamples(scores, n_boot, seed, resample)
    if resample == "patient" and n_boot > 0 and resamples.level == "image":
        notes.items.append(
            "the split has no patient column: the bootstrap resamples images, which "
            "understates the CIs when patients have several images"
        )
    aucs = auc_table(
        scores,
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
        notes=notes,
        counts=None if resamples is None else resamples.counts,
    )
    seconds["aucs"] = time.perf_counter() - t0
    tuned: dict[str, dict[str, np.ndarray]] = {}
    if tuning is not None:
        tuned = tune_all(tuning, list(scores.scores), notes)
    t1 = time.perf_counter()
    focus = focus_member(scores)
    metrics = metrics_table(scores, tuned, notes, alpha=alpha, resamples=resamples, focus=focus)
    seconds["thresholds+metrics"] = time.perf_counter() - t1
    doc = thresholds_document(tuned, tuning_split or "", tuning.n if tuning is not None else 0, scores.labels)
    analysis = Analysis(
        aucs=aucs,
        metrics=metrics,
        thresholds=doc,
        tuned=tuned,
        notes=notes.items,
        seconds=seconds,
        resampling=resamples.level if resamples is not None else "none",
        n_units=resamples.n_units if resamples is not None else 0,
    )
    if calibrate:
        t2 = time.perf_counter()
        analysis.calibration, analysis.calibration_doc, analysis.calibrated = calibration_table(
            scores, tuning, tuning_split=tuning_split, resamples=resamples, alpha=alpha, seed=seed
        )
        seconds["calibration"] = time.perf_counter() - t2
    if subgroups is not None and [g.lower() for g in subgroups] == ["none"]:
        subgroups = []
    specs = list(DEFAULT_GROUPINGS if subgroups is None else subgroups)
    if specs and scores.meta is not None:
        t3 = time.perf_counter()
        threshold = tuned.get(focus, {}).get("f1", np.full(len(scores.labels), 0.5))
        if subgroups is None:  # the defaults: only those the split has columns for
            from cxr.evaluation.subgroups import ALIASES

            specs = [g for g in specs if ALIASES.get(g.split(":")[0], g.split(":")[0]) in scores.meta]
        analysis.subgroups = subgroup_table(
            scores.y_true,
            scores.scores[focus],
            scores.labels,
            scores.meta,
            specs,
            resamples,
            threshold,
            alpha,
            FEW_POSITIVES,
            notes,
        )
        seconds["subgroups"] = time.perf_counter() - t3
    elif subgroups:
        raise CxrError(
            f"--subgroups {' '.join(subgroups)}: the split has no per-image columns — evaluate "
            "shards packed from a splits table, or pass --splits TABLE"
        )
    return analysis


# ------------------------------------------------------------------- figures ---


def _operating_points(
    y: np.ndarray, s: np.ndarray, tuned: dict[str, np.ndarray], c: int
) -> dict[str, tuple[float, float, float]]:
    """(FPR, TPR, precision) on this split at 0.5 and each tuned threshold of label c."""
    points = {}
    for name, thr in {"0.5": 0.5, **{k: v[c] for k, v in tuned.items() if k in _MARKERS}}.items():
        pred = s >= thr
        tp, fp = float((pred & y).sum()), float((pred & ~y).sum())
        n_pos, n_neg = float(y.sum()), float((~y).sum())
        points[name] = (
            fp / n_neg if n_neg else math.nan,
            tp / n_pos if n_pos else math.nan,
            tp / (tp + fp) if tp + fp else math.nan,
        )
    return points


_MARKERS = {"0.5": ("s", "0.5"), "f1": ("o", "F1-tuned"), "youden": ("^", "Youden-tuned")}


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TP, FP) when predicting s >= t for each distinct score t, descending, from (0, 0)."""
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), ys.size - 1]
    tp = np.cumsum(ys, dtype=np.float64)[last]
    return np.r_[0.0, tp], np.r_[0.0, last + 1 - tp]


def _thin(x: np.ndarray, y: np.ndarray, limit: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ~limit points of a curve (a 3-inch panel cannot show more)."""
    if x.size <= limit:
        return x, y
    keep = np.unique(np.r_[np.linspace(0, x.size - 1, limit).astype(int), x.size - 1])
    return x[keep], y[keep]


def _panel_grid(title: str, panels: int = 16):
    """A square grid of at least ``panels`` panels (4 × 4 for the 14 NIH labels + legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(4, math.ceil(math.sqrt(panels)))
    fig, axes = plt.subplots(side, side, figsize=(15 * side / 4, 15 * side / 4), dpi=100)
    fig.suptitle(title, fontsize=15)
    return plt, fig, axes.ravel()


def _member_styles(members: Sequence[str]) -> dict[str, dict[str, Any]]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    styles = {}
    singles = [x for x in members if x != ENSEMBLE]
    if len(singles) == 1 and ENSEMBLE in members:  # an ensemble of one IS its member: one curve, one entry
        return {ENSEMBLE: {"color": "black", "lw": 2.2, "alpha": 1.0, "label": f"{singles[0]} (= {ENSEMBLE} of 1)"}}
    for i, m in enumerate(singles):
        styles[m] = {"color": palette(i % 10), "lw": 1.0, "alpha": 0.75, "label": m}
    styles[ENSEMBLE] = {"color": "black", "lw": 2.2, "alpha": 1.0, "label": ENSEMBLE}
    return styles


def plot_curves(
    path: Path, scores: ScoreSet, aucs: pd.DataFrame, tuned: dict[str, dict[str, np.ndarray]], kind: str, split: str
) -> None:
    """Write roc.png (kind="roc") or pr.png (kind="pr"): 14 panels, members + ensemble,
    the ensemble's operating points (0.5, F1- and Youden-tuned thresholds) marked."""
    title = {"roc": "ROC", "pr": "Precision–recall"}[kind]
    plt, fig, axes = _panel_grid(f"{title} curves — split '{split}', {scores.n} images", len(scores.labels) + 1)
    styles = _member_styles(list(scores.scores))
    metric = "auroc" if kind == "roc" else "auprc"
    lookup = aucs.set_index(["member", "label"])[metric]
    focus = ENSEMBLE if ENSEMBLE in scores.scores else list(scores.scores)[-1]
    for c, (ax, label) in enumerate(zip(axes, scores.labels)):
        rows = ~np.isnan(np.asarray(scores.y_true[:, c], dtype=np.float64))  # the images that know the label
        y = scores.y_true[rows, c].astype(bool)
        ax.set_title(f"{label}  ({metric.upper()} {lookup.get((focus, label), math.nan):.3f})", fontsize=10)
        ax.set_xlim(-0.02, 1.02), ax.set_ylim(-0.02, 1.03)  # room for markers on the edges
        ax.set_xlabel("1 − specificity" if kind == "roc" else "recall", fontsize=8)
        ax.set_ylabel("sensitivity" if kind == "roc" else "precision", fontsize=8)
        ax.tick_params(labelsize=7)
        if y.all() or not y.any():
            ax.text(0.5, 0.5, "undefined:\nonly one class", ha="center", va="center")
            continue
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        else:
            ax.axhline(y.mean(), color="0.7", lw=0.8, ls="--")
        for member in styles:
            tp, fp = _cumulative_counts(y, scores.scores[member][rows, c])
            if kind == "roc":
                ax.plot(*_thin(fp / fp[-1], tp / tp[-1]), **styles[member])
            else:
                ax.plot(*_thin(tp[1:] / tp[-1], tp[1:] / (tp[1:] + fp[1:])), drawstyle="steps-pre", **styles[member])
        points = _operating_points(y, scores.scores[focus][rows, c], tuned.get(focus, {}), c)
        for name, (fpr, tpr, ppv) in points.items():
            marker, text = _MARKERS[name]
            xy = (fpr, tpr) if kind == "roc" else (tpr, ppv)
            ax.plot(*xy, marker=marker, ms=8, mfc="none", mec="red", mew=1.6, ls="none", label=f"{focus} @ {text}")
    _legend_panel(axes, styles, tuned, focus, kind, len(scores.labels))
    # fixed margins: tight_layout would cost a second full draw
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=0.94, wspace=0.28, hspace=0.32)
    _save_png(fig, path)
    plt.close(fig)


def plot_reliability(
    path: Path, scores: ScoreSet, calibrated: np.ndarray | None, split: str, analysis: Analysis | None = None
) -> None:
    """reliability.png: a panel per label of the focus score set's equal-width reliability
    diagram (observed frequency against mean predicted probability per bin, before and after
    post-hoc calibration), with each bin's image count as a bar on a log axis underneath."""
    from cxr.evaluation.calibration import N_BINS, reliability_bins

    focus = focus_member(scores)
    plt, fig, axes = _panel_grid(
        f"Reliability ({N_BINS} equal-width bins) — `{focus}` on split '{split}', {scores.n} images",
        len(scores.labels) + 1,
    )
    series = {"raw": (scores.scores[focus], "0.45", "o")}
    if calibrated is not None:
        series["calibrated"] = (calibrated, "tab:blue", "s")
    for c, (ax, label) in enumerate(zip(axes, scores.labels)):
        rows = ~np.isnan(np.asarray(scores.y_true[:, c], dtype=np.float64))  # the images that know the label
        y = scores.y_true[rows, c]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        counts = ax.twinx()
        counts.set_yscale("log")
        counts.tick_params(labelsize=6, colors="0.5")
        width = 1.0 / N_BINS
        for i, (name, (probs, color, marker)) in enumerate(series.items()):
            b = reliability_bins(y, probs[rows, c], N_BINS, "width")
            full = b["count"] > 0
            ax.plot(b["mean_p"][full], b["freq"][full], marker=marker, ms=4, color=color, lw=1.2, label=name)
            left = b["edges"][:-1] + i * width / 2
            counts.bar(left[full], b["count"][full], width=width / 2, align="edge", color=color, alpha=0.25)
        counts.set_ylim(0.8, max(10.0, scores.n) * 30)  # bars in the lower part of the panel
        ax.set_zorder(counts.get_zorder() + 1), ax.patch.set_visible(False)
        ax.set_xlim(0, 1), ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{label}  ({int(y.sum())} positives)" + _ece_title(analysis, focus, label), fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(scores.labels) :]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], color=color, marker=marker, label=f"{focus} {name}")
        for name, (_, color, marker) in series.items()
    ]
    handles += [
        Patch(color="0.45", alpha=0.25, label="images per bin (right axis, log)"),
        Line2D([], [], color="0.7", ls="--", label="perfect calibration"),
    ]
    axes[len(scores.labels)].legend(handles=handles, loc="upper left", fontsize=10, frameon=False)
    fig.subplots_adjust(left=0.05, right=0.96, bottom=0.04, top=0.93, wspace=0.38, hspace=0.42)
    _save_png(fig, path)
    plt.close(fig)


def _ece_title(analysis: Analysis | None, focus: str, label: str) -> str:
    """ "\nECE 0.050 → 0.021 (platt)" for a reliability panel (empty without a calibration table)."""
    if analysis is None or analysis.calibration is None:
        return ""
    t = analysis.calibration
    rows = t[(t["member"] == focus) & (t["label"] == label)].set_index("variant")
    text = f"\nECE {_fmt(rows.loc['raw', 'ece_width'])}"
    if "calibrated" in rows.index:
        text += f" → {_fmt(rows.loc['calibrated', 'ece_width'])} (map: {rows.loc['calibrated', 'method']})"
    return text


def _legend_panel(axes, styles, tuned, focus: str, kind: str, n_labels: int = len(LABELS)) -> None:
    from matplotlib.lines import Line2D

    for ax in axes[n_labels:]:
        ax.axis("off")
    handles = [Line2D([], [], color=st["color"], lw=st["lw"], label=st["label"]) for st in styles.values()]
    for name in ("0.5", *(k for k in tuned.get(focus, {}) if k in _MARKERS)):
        marker, text = _MARKERS[name]
        handles.append(
            Line2D(
                [],
                [],
                marker=marker,
                ms=8,
                mfc="none",
                mec="red",
                mew=1.6,
                ls="none",
                label=f"{focus} threshold: {text}",
            )
        )
    chance = "chance (diagonal)" if kind == "roc" else "chance (prevalence)"
    handles.append(Line2D([], [], color="0.7", lw=0.8, ls="--", label=chance))
    axes[n_labels].legend(handles=handles, loc="upper left", fontsize=10, frameon=False)


def _save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getvalue())


# ------------------------------------------------------------------- tables ----


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def auroc_wide(aucs: pd.DataFrame, with_ci: bool = True) -> pd.DataFrame:
    """Label × member table of AUROC strings ("0.812 [0.80, 0.83]") plus prevalence (%)."""
    members = list(dict.fromkeys(aucs["member"]))
    table = pd.DataFrame(index=_label_rows(aucs))
    first = aucs[aucs["member"] == members[0]].set_index("label")
    table["prevalence %"] = [_fmt(100 * first.loc[label, "prevalence"], 2) for label in table.index]
    for member in members:
        rows = aucs[aucs["member"] == member].set_index("label")
        table[member] = [
            _fmt(r.auroc)
            + (f" [{_fmt(r.ci_low, 2)}, {_fmt(r.ci_high, 2)}]" if with_ci and np.isfinite(r.ci_low) else "")
            for r in (rows.loc[label] for label in table.index)
        ]
    table.index.name = "label"
    return table


def _label_rows(aucs: pd.DataFrame) -> list[str]:
    """The table's labels in their order, then the mean row."""
    return [*dict.fromkeys(label for label in aucs["label"] if label != MEAN), MEAN]


def format_stdout_table(aucs: pd.DataFrame) -> str:
    """The per-label AUROC table (members and ensemble, with CIs) as fixed-width text."""
    return auroc_wide(aucs).to_string()


def _markdown(frame: pd.DataFrame, index: bool = True) -> str:
    frame = frame.reset_index() if index else frame
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _published_columns(table: pd.DataFrame) -> pd.DataFrame:
    from cxr.evaluation.published import PUBLISHED, published_mean

    if [label for label in table.index if label != MEAN] != list(LABELS):
        return table  # published numbers exist only for the 14 NIH labels
    for column in PUBLISHED:
        name = column.name + ("" if column.comparable else " †")
        table[name] = [
            _fmt(column.auroc[label]) if label in column.auroc else _fmt(published_mean(column))
            for label in table.index
        ]
    return table


def _auprc_wide(aucs: pd.DataFrame) -> pd.DataFrame:
    members = list(dict.fromkeys(aucs["member"]))
    table = pd.DataFrame(index=_label_rows(aucs))
    for member in members:
        rows = aucs[aucs["member"] == member].set_index("label")
        table[member] = [_fmt(rows.loc[label, "auprc"]) for label in table.index]
    table.index.name = "label"
    return table


def _threshold_summary(metrics: pd.DataFrame, member: str) -> pd.DataFrame:
    rows = metrics[(metrics["member"] == member) & metrics["label"].isin(["macro", "micro"])]
    out = pd.DataFrame(
        {
            "thresholds": rows["thresholds"],
            "average": rows["label"],
            **{name: rows[name].map(_fmt) for name in METRIC_COLUMNS},
            "Hamming loss": rows["hamming_loss"].map(_fmt),
            "exact match": rows["exact_match"].map(_fmt),
        }
    )
    return out


def _members_table(members: Sequence[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for m in members:
        options = ", ".join(
            f"{k}={v}" for k, v in (m.get("model_options") or {}).items() if v not in (None, False, "none", 0, 0.0)
        )
        best_val = m.get("best_val")
        if isinstance(best_val, dict):
            best_val = ", ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in best_val.items())
        rows.append(
            {
                "member": m.get("name"),
                "model": m.get("model"),
                "options": options or "—",
                "loss": m.get("loss") or "—",
                "lr": m.get("lr") if m.get("lr") is not None else "—",
                "seed": m.get("seed") if m.get("seed") is not None else "—",
                "train px": m.get("train_resolution") or "—",
                "eval px": m.get("eval_resolution") or "—",
                "best epoch": m.get("best_epoch") if m.get("best_epoch") is not None else "—",
                "best val": best_val or "—",
                "run dir": f"`{m.get('run_dir')}`",
            }
        )
    return pd.DataFrame(rows)


def _validity_note(aucs: pd.DataFrame, focus: str) -> str:
    """How many resamples each CI rests on, and which labels have too few positives (report.md)."""
    rows = aucs[aucs["member"] == focus].set_index("label")
    n_boot = int(rows["n_boot"].iloc[0])
    text = (
        f"the mean-AUROC CI is a per-label-mean bootstrap (each resample's mean over the labels "
        f"with both classes in it): `{focus}` mean from {int(rows.loc[MEAN, 'n_valid'])} of {n_boot} "
        f"valid resamples"
    )
    partial = [
        f"{label} {int(rows.loc[label, 'n_valid'])}/{n_boot}"
        for label in rows.index
        if label != MEAN and 0 < rows.loc[label, "n_valid"] < n_boot
    ]
    if partial:
        text += "; labels defined in fewer resamples: " + ", ".join(partial)
    return text


def _unit_text(analysis: Analysis) -> str:
    """What the bootstrap resampled, for report.md."""
    if analysis.resampling == "patient":
        return (
            f"patients ({analysis.n_units} patients: each resample draws whole patients, all their "
            f"images with them; --resample image draws images)"
        )
    return "images (each image drawn independently)"


def _few_positives_note(aucs: pd.DataFrame) -> list[str]:
    """A report.md bullet naming the labels with fewer than FEW_POSITIVES positives (or nothing)."""
    rows = aucs[aucs["member"] == aucs["member"].iloc[0]].set_index("label")
    few = [
        f"{label} ({int(rows.loc[label, 'n_pos'])})"
        for label in rows.index
        if label != MEAN and rows.loc[label, "few_positives"]
    ]
    if not few:
        return []
    return [
        f"- **labels with fewer than {FEW_POSITIVES} positives** (their AUROC and CI rest on very few "
        f"images; `few_positives` in aucs.csv): " + ", ".join(few)
    ]


def _ci(value: float, low: float, high: float, digits: int = 3) -> str:
    return _fmt(value, digits) + (f" [{_fmt(low, digits)}, {_fmt(high, digits)}]" if np.isfinite(low) else "")


def _map_text(entry: dict[str, Any]) -> str:
    method = entry.get("method")
    if method == "temperature":
        return f"temperature T={entry['temperature']:.3g}"
    if method == "platt":
        return f"Platt a={entry['a']:.3g}, b={entry['b']:.3g}"
    return "none"


def _calibration_section(analysis: Analysis, focus: str, split: str, level: int) -> list[str]:
    table = analysis.calibration
    if table is None:
        return []
    rows = table[table["member"] == focus]
    raw = rows[rows["variant"] == "raw"].set_index("label")
    cal = rows[rows["variant"] == "calibrated"].set_index("label")
    maps = (analysis.calibration_doc or {}).get("labels", {})
    out = []
    for label in raw.index:
        r = raw.loc[label]
        line = {
            "label": label,
            "ECE raw": _ci(r.ece_width, r.ece_width_low, r.ece_width_high),
            "ECE (equal mass) raw": _fmt(r.ece_mass),
            "Brier raw": _ci(r.brier, r.brier_low, r.brier_high),
            "REL / RES / UNC": f"{_fmt(r.reliability, 4)} / {_fmt(r.resolution, 4)} / {_fmt(r.uncertainty, 4)}",
        }
        if label in cal.index:
            c = cal.loc[label]
            line.update(
                {
                    "ECE calibrated": _ci(c.ece_width, c.ece_width_low, c.ece_width_high),
                    "ECE (equal mass) calibrated": _fmt(c.ece_mass),
                    "Brier calibrated": _ci(c.brier, c.brier_low, c.brier_high),
                    "map (fitted on " + str((analysis.calibration_doc or {}).get("fitted_on")) + ")": _map_text(
                        maps[label]
                    )
                    if label in maps
                    else "mean of the labels",
                }
            )
        out.append(line)
    ci_text = (
        f"{level} % CIs from the same {analysis.resampling}-level bootstrap as the AUROCs (equal-mass bin "
        "edges fixed at the full split's)"
        if analysis.resampling != "none"
        else "no CIs (--bootstrap 0)"
    )
    text = [
        f"## Calibration of `{focus}` on `{split}`",
        "",
        "ECE (expected calibration error) is the image-weighted mean gap between the predicted probability and the "
        "observed frequency of the finding over 15 bins (0 = a probability of 0.3 comes true 30 % of the time); "
        "Brier is the mean squared error of the probability, = reliability − resolution + uncertainty "
        "(REL / RES / UNC, equal-width bins: lower REL and higher RES are better, UNC is the label's own "
        f"variance). ECE columns use equal-width bins unless named equal mass; {ci_text}. ECE is biased upward "
        "on small samples (bin noise), and more so within a resample that repeats images, so on a small split "
        "its interval can sit above the estimate; read it as the spread, not a bias-corrected range.",
        "",
    ]
    if not cal.empty:
        text += [
            "Post-hoc calibration (monotone, so AUROC and the ranking are unchanged): temperature "
            "σ(logit p / T) and Platt σ(a logit p + b) per label, fitted on the threshold split, the map per "
            "label chosen by 5-fold cross-validated log-loss there (none when neither helps) and applied here. "
            "The fitted parameters are in `calibration.json` (for `cxr.tools.export`); every member and variant in "
            "`calibration.csv`; the diagrams in `reliability.png`.",
            "",
        ]
    return text + [_markdown(pd.DataFrame(out), index=False), "", "![Reliability diagrams](reliability.png)", ""]


def _operating_section(analysis: Analysis, focus: str, split: str, level: int) -> list[str]:
    if not analysis.tuned:
        return []
    names = {
        "f1": "F1-optimal",
        "youden": "Youden-optimal",
        "sens90": "sensitivity ≥ 0.90",
        "sens95": "sensitivity ≥ 0.95",
        "spec90": "specificity ≥ 0.90",
    }
    m = analysis.metrics
    rows = m[(m["member"] == focus) & m["thresholds"].isin(["f1", "sens90", "spec90"])]
    out = []
    for label in [*scores_labels(m, focus), "micro"]:
        for set_name in ("f1", "sens90", "spec90"):
            r = rows[(rows["label"] == label) & (rows["thresholds"] == set_name)]
            if r.empty:
                continue
            r = r.iloc[0]
            out.append(
                {
                    "label": label,
                    "threshold (chosen on val)": f"{names[set_name]}"
                    + (f" = {r.threshold:.3f}" if label != "micro" else ""),
                    **{
                        k: _ci(r[k], r[f"{k}_low"], r[f"{k}_high"], 2)
                        for k in ("sensitivity", "specificity", "ppv", "npv", "f1")
                    },
                }
            )
    return [
        f"## Operating points of `{focus}` on `{split}` ({level} % CIs)",
        "",
        "Each threshold is chosen on the threshold split — the F1 optimum, the highest threshold still reaching "
        "90 % sensitivity there, the lowest reaching 90 % specificity — and applied unchanged here, so the "
        "sensitivity a target promised can come out lower on this split. Sensitivity, specificity, PPV and NPV "
        "carry Wilson score intervals (images as independent trials: narrower than a patient-level interval); "
        f"F1 a percentile-bootstrap interval ({analysis.resampling} level). Youden, sensitivity ≥ 0.95 and 0.5 "
        "are in `metrics.csv` with the same columns, for every member.",
        "",
        _markdown(pd.DataFrame(out), index=False),
        "",
    ]


def scores_labels(metrics: pd.DataFrame, member: str) -> list[str]:
    """The per-label rows of metrics.csv in order (not macro/micro)."""
    labels = metrics.loc[metrics["member"] == member, "label"]
    return [x for x in dict.fromkeys(labels) if x not in ("macro", "micro")]


def _subgroup_section(analysis: Analysis, focus: str, split: str, level: int) -> list[str]:
    table = analysis.subgroups
    if table is None or table.empty:
        return []
    text = [
        f"## Subgroups of `{focus}` on `{split}` ({level} % CIs)",
        "",
        "AUROC per group with its bootstrap CI; each group is compared with the largest group of its grouping "
        "(the reference): the gap (group − reference) with a bootstrap CI over the same resamples and an unpaired "
        "DeLong test, Holm-adjusted over the labels (`p_holm`; * below 0.05). † marks fewer than "
        f"{FEW_POSITIVES} positives in the group (CI rests on very few images). Under-diagnosis "
        "(Seyyed-Kalantari et al. 2021) is the share of sick images (any finding) that the F1-tuned thresholds "
        "(0.5 without a threshold split) call No Finding (no label above its threshold), with a Wilson CI and a bootstrap CI of its gap. "
        "All numbers, with n, positives and patients per group, are in `subgroups.csv`.",
        "",
    ]
    for grouping, part in table.groupby("grouping", sort=False):
        auc = part[part["metric"] == "auroc"]
        groups = list(dict.fromkeys(auc["group"]))
        reference = auc["reference"].iloc[0]
        rows = []
        for label in dict.fromkeys(auc["label"]):
            line = {"label": label}
            for g in groups:
                r = auc[(auc["label"] == label) & (auc["group"] == g)].iloc[0]
                line[f"{g} (n={r.n})"] = _ci(r.value, r.ci_low, r.ci_high, 2) + (" †" if r.few_positives else "")
            for g in groups[1:]:
                r = auc[(auc["label"] == label) & (auc["group"] == g)].iloc[0]
                star = " *" if np.isfinite(r.p_holm) and r.p_holm < 0.05 else ""
                line[f"{g} − {reference}"] = (
                    _ci(r.gap, r.gap_low, r.gap_high, 3) + f", p_holm {_fmt(r.p_holm, 3)}{star}"
                )
            rows.append(line)
        text += [f"### {grouping} — AUROC", "", _markdown(pd.DataFrame(rows), index=False), ""]
    under = table[table["metric"] == "underdiagnosis"]
    rows = [
        {
            "grouping": r.grouping,
            "group": r.group,
            "sick images": r.n_pos,
            "under-diagnosis rate": _ci(r.value, r.ci_low, r.ci_high, 3),
            "gap vs reference": "reference" if r.group == r.reference else _ci(r.gap, r.gap_low, r.gap_high, 3),
        }
        for r in under.itertuples()
    ]
    return text + ["### Under-diagnosis (sick called No Finding)", "", _markdown(pd.DataFrame(rows), index=False), ""]


def label_mapping_section(mapping: dict[str, Any] | None) -> list[str]:
    """report.md lines: which harmonisation rows (shards/datasets/labelmap.csv) made the shards'
    labels from each data set's findings — nothing for shards packed from an NIH or generic table."""
    if not mapping:
        return []
    rows = [
        {
            "dataset": r["dataset"],
            "source finding": r["source"],
            "label": r["target"] or "—",
            "relation": r["relation"],
        }
        for r in mapping.get("rows", [])
    ]
    return [
        f"## Label mapping ({', '.join(mapping.get('datasets', []))} → NIH 14)",
        "",
        f"From `{mapping.get('table')}` (sha256 {str(mapping.get('sha256', ''))[:12]}…). A label no row feeds is "
        "unknown for that data set (not negative); a `merged` finding is never split into its labels.",
        "",
        _markdown(pd.DataFrame(rows), index=False),
        "",
    ]


def report_markdown(
    analysis: Analysis, scores: ScoreSet, *, split: str, context: dict[str, Any], members: Sequence[dict[str, Any]]
) -> str:
    """report.md: per-label AUROC of members vs ensemble with published columns, AUPRC,
    threshold metrics, run configs and figures. ``context``: split-level facts
    (ensemble method, bootstrap, seed, alpha, thresholds split, shards, source)."""
    from cxr.evaluation.published import CHEXNET_2017, WANG_2017

    level = round(100 * (1 - context.get("alpha", 0.05)))
    focus = ENSEMBLE if ENSEMBLE in scores.scores else list(scores.scores)[-1]
    boot = context.get("bootstrap", 0)
    lines = [
        f"# Evaluation report — split `{split}`",
        "",
        f"- images: {scores.n}; members: {len([m for m in scores.scores if m != ENSEMBLE])}; "
        f"ensemble: {context.get('ensemble', 'mean-prob')} of the members' outputs",
        f"- AUROC CI: {level} % percentile bootstrap over {_unit_text(analysis)}, {boot} resamples shared by all "
        f"members and the ensemble (seed {context.get('seed', 0)}); {_validity_note(analysis.aucs, focus)}"
        if boot
        else "- AUROC CI: none (--bootstrap 0)",
        *_few_positives_note(analysis.aucs),
        f"- thresholds tuned on split `{context.get('thresholds_from')}` "
        f"({analysis.thresholds.get('n_images', 0)} images)"
        if analysis.tuned
        else "- thresholds: 0.5 only",
        f"- source: {context.get('source', '')}",
        f"- written: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"## Per-label AUROC ({level} % CI) — members vs ensemble",
        "",
        _markdown(_published_columns(auroc_wide(analysis.aucs))),
        "",
        f"Prevalence is that of this split (`{split}`). Published columns: {WANG_2017.note}; "
        f"comparable only if this split is that official test list (25,596 images; this one has "
        f"{scores.n}). † {CHEXNET_2017.note}. Their mean rows are the unweighted means of the 14 labels.",
        "",
        "## AUPRC (chance level = prevalence)",
        "",
        _markdown(_auprc_wide(analysis.aucs)),
        "",
        f"## Threshold metrics of `{focus}` on `{split}`",
        "",
        _markdown(_threshold_summary(analysis.metrics, focus), index=False),
        "",
        "Per-label values for every member are in `metrics.csv`; thresholds in `thresholds.json`.",
        "",
        *context.get("sections", []),  # sections of other modules (cxr.evaluation.cross_site's external validation)
        *_operating_section(analysis, focus, split, level),
        *_calibration_section(analysis, focus, split, level),
        *_subgroup_section(analysis, focus, split, level),
        *label_mapping_section(context.get("label_mapping")),
        "## Members (run configs)",
        "",
        _markdown(_members_table(members), index=False) if members else "(not recorded)",
        "",
        "## Figures",
        "",
        "![ROC curves](roc.png)",
        "",
        "![Precision-recall curves](pr.png)",
        "",
    ]
    notes = list(analysis.notes) + list(context.get("notes", []))
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def write_outputs(
    out: Path,
    analysis: Analysis,
    scores: ScoreSet,
    *,
    split: str,
    context: dict[str, Any],
    members: Sequence[dict[str, Any]],
    figures: bool = True,
) -> dict[str, float]:
    """Write aucs.csv, thresholds.json, metrics.csv, calibration.csv, calibration.json,
    subgroups.csv, roc.png, pr.png, reliability.png, report.md (atomic; each when computed).

    Returns seconds spent per group (tables, figures).
    """
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    atomic_write_text(out / "aucs.csv", analysis.aucs.to_csv(index=False))
    atomic_write_text(out / "metrics.csv", analysis.metrics.to_csv(index=False))
    atomic_write_text(out / "thresholds.json", json.dumps(analysis.thresholds, indent=2) + "\n")
    if analysis.calibration is not None:
        atomic_write_text(out / "calibration.csv", analysis.calibration.to_csv(index=False))
    if analysis.calibration_doc is not None:
        from cxr.evaluation.calibration import write_calibration

        write_calibration(out, analysis.calibration_doc)
    if analysis.subgroups is not None:
        atomic_write_text(out / "subgroups.csv", analysis.subgroups.to_csv(index=False))
    seconds = {"tables": time.perf_counter() - t0}
    if figures:
        t1 = time.perf_counter()
        plot_curves(out / "roc.png", scores, analysis.aucs, analysis.tuned, "roc", split)
        plot_curves(out / "pr.png", scores, analysis.aucs, analysis.tuned, "pr", split)
        if analysis.calibration is not None:
            plot_reliability(out / "reliability.png", scores, analysis.calibrated, split, analysis)
        seconds["figures"] = time.perf_counter() - t1
    atomic_write_text(
        out / "report.md", report_markdown(analysis, scores, split=split, context=context, members=members)
    )
    return seconds
