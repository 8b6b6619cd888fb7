"""The evaluation's numbers, from scores already inferred.

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

Every CI uses the same resamples (``cxr.evaluation.stats.Resamples``): whole patients when the split
knows them (``ScoreSet.meta["patient"]``), else images.

Threshold tuning and metrics.csv live in cxr.evaluation.thresholds; the markdown in
cxr.evaluation.tables, the figures in cxr.evaluation.figures. Nothing here loads models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cxr.evaluation.scores import MEAN, ScoreSet, focus_member
from cxr.evaluation.thresholds import Notes, metrics_table, thresholds_document, tune_all
from cxrbase.errors import CxrError


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


FEW_POSITIVES = 10  # labels with fewer positives than this are flagged in aucs.csv and report.md
AUC_COLUMNS = (
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
)  # aucs.csv


def auc_table(
    scores: ScoreSet,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    notes: Notes | None = None,
    progress: bool = True,
    counts: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per member and label (+ ``mean``): auroc, ci_low, ci_high, auprc, prevalence, n_pos, n.

    The CIs are percentile-bootstrap intervals at level 1 − alpha over images; every
    member and the ensemble use the same resamples (``cxr.evaluation.stats.bootstrap_counts``
    with ``seed``, or the given ``counts`` [N, n_boot], e.g. patient-level
    ``cxr.evaluation.stats.Resamples.counts``). ``n_boot=0`` leaves the CI columns NaN.
    """
    from cxr.evaluation.metrics import per_label_auprc, per_label_auroc
    from cxr.evaluation.stats import bootstrap_auroc, bootstrap_counts
    from cxrbase.progress import progress as progress_bar

    notes = notes or Notes()
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
    return pd.DataFrame(rows, columns=list(AUC_COLUMNS))


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


CALIBRATION_METRICS = ("ece_width", "ece_mass", "brier", "reliability", "resolution", "uncertainty", "logloss")
CALIBRATION_CI = ("ece_width", "ece_mass", "brier")  # bootstrapped for the focus score set
VARIANTS = ("raw", "temperature", "platt", "calibrated")  # calibrated: each label's chosen map


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
    from cxr.evaluation.stats import Resamples

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

    notes, seconds = Notes(), {}
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
    t3 = time.perf_counter()
    analysis.subgroups = _subgroup_analysis(scores, subgroups, tuned, focus, resamples, alpha, notes)
    if analysis.subgroups is not None:
        seconds["subgroups"] = time.perf_counter() - t3
    return analysis


def _subgroup_analysis(
    scores: ScoreSet,
    subgroups: Sequence[str] | None,
    tuned: dict[str, dict[str, np.ndarray]],
    focus: str,
    resamples: Any,
    alpha: float,
    notes: Notes,
) -> pd.DataFrame | None:
    """analyse's subgroups.csv table (cxr.evaluation.subgroups) of the focus score set at its
    F1-tuned thresholds; None when there are no groupings to compute."""
    from cxr.evaluation.subgroups import DEFAULT_GROUPINGS, subgroup_table

    if subgroups is not None and [g.lower() for g in subgroups] == ["none"]:
        subgroups = []
    specs = list(DEFAULT_GROUPINGS if subgroups is None else subgroups)
    if specs and scores.meta is not None:
        threshold = tuned.get(focus, {}).get("f1", np.full(len(scores.labels), 0.5))
        if subgroups is None:  # the defaults: only those the split has columns for
            from cxr.evaluation.subgroups import ALIASES

            specs = [g for g in specs if ALIASES.get(g.split(":")[0], g.split(":")[0]) in scores.meta]
        return subgroup_table(
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
    elif subgroups:
        raise CxrError(
            f"--subgroups {' '.join(subgroups)}: the split has no per-image columns — evaluate "
            "shards packed from a splits table, or pass --splits TABLE"
        )
    return None
