"""Evaluation metrics of SPEC.md: numpy arrays in, plain numbers/arrays out, no I/O.

Shapes: ``y_true`` is ``[n, L]`` of 0/1 (bool/int/float), ``y_score`` is ``[n, L]``
of finite scores (probabilities for the threshold metrics); a 1-D ``[n]`` input is
treated as one label. Per-label results are ``[L]`` float64 arrays.

Conventions (stated once, tested against scikit-learn):

- A prediction is positive when ``score >= threshold`` (as in sklearn's ``roc_curve``).
- AUROC is undefined for a label without positives or without negatives; AUPRC
  for a label without positives. Those labels give NaN and ONE
  :class:`UndefinedMetricWarning` naming them — never a crash, never a silent
  0.5 (sklearn raises for AUROC and returns 0 for AUPRC there; we prefer NaN).
- Ratio metrics with a zero denominator follow sklearn's default
  ``zero_division="warn"``: the value is 0.0 and one warning names the cases.
  Sensitivity TP/(TP+FN) = ``recall_score``; specificity TN/(TN+FP) =
  ``recall_score(pos_label=0)``; PPV TP/(TP+FP) = ``precision_score``; NPV
  TN/(TN+FN) = ``precision_score(pos_label=0)``; F1 2TP/(2TP+FP+FN) = ``f1_score``
  (0 when TP+FP+FN = 0). Macro = mean of the per-label values (sklearn
  ``average="macro"``, zero-division zeros included); micro = the formula on
  the counts summed over labels (sklearn ``average="micro"``).
- Mean AUROC / AUPRC (macro) average the labels where they are defined.
- Unknown labels: ``y_true`` may hold NaN (the loaders' unknown, a masked `.labels` entry). Every
  per-label metric then uses, for label c, only the images that know c (sklearn on those rows);
  micro numbers pool the known (image, label) pairs, Hamming loss is over known pairs and an
  image's exact match asks only its known labels. Without NaN nothing changes.

The uncertainty of these numbers (bootstrap CIs, DeLong, Holm) is in cxr.evaluation.stats.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

RATIO_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for some labels (NaN) or hit a zero denominator (0.0)."""


# --------------------------------------------------------------------------- inputs
def _as_2d(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and return (bool [n, L] (False where unknown), float64 [n, L], known bool [n, L]);
    1-D inputs become L = 1. NaN in y_true is an unknown (masked) label."""
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.shape != s.shape or y.ndim != 2 or y.shape[0] == 0:
        raise CxrError(
            f"metrics: y_true {y.shape} and y_score {s.shape} must be equal, "
            f"non-empty [n, L] arrays — pass one row per image, one column per label"
        )
    known = ~np.isnan(y) if y.dtype.kind == "f" else np.ones(y.shape, bool)
    if not np.isin(y[known], (0, 1)).all():
        raise CxrError("metrics: y_true holds values other than 0/1 (or NaN = unknown) — binarise the labels first")
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).sum())
        raise CxrError(f"metrics: y_score holds {bad} NaN/inf values — check the model outputs")
    return np.where(known, y, 0).astype(bool), s, known


def _names(n_labels: int, labels: Sequence[str] | None = None) -> list[str]:
    if labels is not None:
        if len(labels) != n_labels:
            raise CxrError(f"metrics: {len(labels)} label names for {n_labels} columns — pass one name per column")
        return list(labels)
    return list(LABELS) if n_labels == len(LABELS) else [f"label_{i}" for i in range(n_labels)]


def _warn(what: str, cases: list[str]) -> None:
    if cases:
        warnings.warn(f"{what}: {', '.join(cases)}", UndefinedMetricWarning, stacklevel=3)


def _thresholds(thresholds, n_labels: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim > 1 or t.size not in (1, n_labels):
        raise CxrError(f"metrics: {t.size} thresholds for {n_labels} labels — pass one per label or a scalar")
    t = np.broadcast_to(t.reshape(-1), (n_labels,)).copy()
    if not np.isfinite(t).all():
        raise CxrError("metrics: thresholds must be finite — tune them with tune_thresholds or use 0.5")
    return t


# ------------------------------------------------------------------ ranking metrics
def _binary_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (TP, FP) at each distinct score, scores descending (sklearn's curve).

    Returns (thresholds [k], tps [k], fps [k]); predicting ``s >= thresholds[i]``
    gives ``tps[i]`` true and ``fps[i]`` false positives.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.float64)[last]
    fps = (last + 1) - tps
    return s_sorted[last], tps, fps


def _undefined_auroc(y: np.ndarray, known: np.ndarray, names: list[str]) -> np.ndarray:
    """Boolean [L] of labels lacking known positives or negatives; warns once naming them."""
    n_pos, n_known = y.sum(axis=0), known.sum(axis=0)
    undefined = (n_pos == 0) | (n_pos == n_known)
    cases = [
        f"{names[c]} (no {'known label' if n_known[c] == 0 else 'positives' if n_pos[c] == 0 else 'negatives'})"
        for c in np.flatnonzero(undefined)
    ]
    _warn("AUROC undefined (NaN) for labels without both classes", cases)
    return undefined


def per_label_auroc(y_true, y_score) -> np.ndarray:
    """Area under the ROC curve per label, ties counted 1/2 (= sklearn roc_auc_score).

    y_true, y_score: [n, L]. Returns [L] float64; NaN (with one warning) for a label
    without positives or without negatives.
    """
    y, s, known = _as_2d(y_true, y_score)
    undefined = _undefined_auroc(y, known, _names(y.shape[1]))
    out = np.full(y.shape[1], np.nan)
    for c in np.flatnonzero(~undefined):
        k = known[:, c]
        _, tps, fps = _binary_curve(y[k, c], s[k, c])
        tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
        # Trapezoids on the ROC step curve give exactly the Mann-Whitney U with ties as 1/2.
        area = np.sum(np.diff(fps) * (tps[1:] + tps[:-1])) / 2.0
        out[c] = area / (tps[-1] * fps[-1])
    return out


def per_label_auprc(y_true, y_score) -> np.ndarray:
    """Average precision per label, sum_k (R_k - R_{k-1}) P_k (= sklearn average_precision_score).

    y_true, y_score: [n, L]. Returns [L] float64; NaN (with one warning) for a label
    without positives.
    """
    y, s, known = _as_2d(y_true, y_score)
    names = _names(y.shape[1])
    n_pos = y.sum(axis=0)
    _warn("AUPRC undefined (NaN) for labels without positives", [names[c] for c in np.flatnonzero(n_pos == 0)])
    out = np.full(y.shape[1], np.nan)
    for c in np.flatnonzero(n_pos > 0):
        k = known[:, c]
        _, tps, fps = _binary_curve(y[k, c], s[k, c])
        precision = tps / (tps + fps)
        recall = tps / tps[-1]
        out[c] = np.sum(np.diff(np.r_[0.0, recall]) * precision)
    return out


# ------------------------------------------------------------------ threshold metrics
def _safe_ratio(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """num/den with 0.0 where den == 0 (sklearn zero_division default); also the mask."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    zero = den == 0
    return np.divide(num, den, out=np.zeros_like(num), where=~zero), zero


def _ratios(tp, fp, tn, fn) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The five ratio metrics from confusion counts (any shape): name -> (value, zero-division mask)."""
    return {
        "sensitivity": _safe_ratio(tp, tp + fn),
        "specificity": _safe_ratio(tn, tn + fp),
        "ppv": _safe_ratio(tp, tp + fp),
        "npv": _safe_ratio(tn, tn + fn),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn),
    }


def threshold_metrics(y_true, y_score, thresholds) -> dict:
    """Confusion-matrix metrics at per-label thresholds (predict positive if score >= t).

    y_true, y_score: [n, L]; thresholds: scalar or [L]. Returns a dict with
    per-label [L] arrays ``sensitivity, specificity, ppv, npv, f1, tp, fp, tn, fn,
    thresholds``; ``macro`` and ``micro`` dicts of those five metrics (floats); and
    ``hamming_loss`` (fraction of wrong label decisions) and ``exact_match`` (fraction
    of images with all L decisions right). Zero denominators give 0.0 (see module doc).
    """
    y, s, known = _as_2d(y_true, y_score)
    names = _names(y.shape[1])
    t = _thresholds(thresholds, y.shape[1])
    pred = s >= t
    tp = (pred & y).sum(axis=0)
    fp = (pred & ~y & known).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    tn = known.sum(axis=0) - tp - fp - fn
    out: dict = {"thresholds": t, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    out["macro"], out["micro"] = {}, {}
    cases = []
    micro = _ratios(tp.sum(), fp.sum(), tn.sum(), fn.sum())
    for name, (value, zero) in _ratios(tp, fp, tn, fn).items():
        out[name] = value
        out["macro"][name] = float(value.mean())
        out["micro"][name] = float(micro[name][0])
        cases += [f"{name} of {names[c]}" for c in np.flatnonzero(zero)]
    _warn("zero denominator, metric set to 0.0", cases)
    wrong = (pred != y) & known
    out["hamming_loss"] = float(wrong.sum() / max(int(known.sum()), 1))
    out["exact_match"] = float((~wrong.any(axis=1)).mean())
    return out


def tune_thresholds(y_true, y_score, method: str = "f1") -> np.ndarray:
    """Per-label threshold maximising F1 (``f1``) or TPR - FPR (``youden``) on these data.

    y_true, y_score: [n, L] (validation set). Returns [L] thresholds, each one of the
    observed scores (the highest one among ties of the criterion). A label without
    positives or negatives gets 0.5, with one warning naming it.
    """
    if method not in ("f1", "youden"):
        raise CxrError(f"tune_thresholds: method={method!r} — choose 'f1' or 'youden'")

    def pick(thr: np.ndarray, tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int) -> float:
        criterion = 2 * tps / (tps + fps + n_pos) if method == "f1" else tps / n_pos - fps / n_neg
        return thr[np.argmax(criterion)]

    return _per_label_threshold(y_true, y_score, pick, f"{method} threshold")


def _per_label_threshold(y_true, y_score, pick, what: str) -> np.ndarray:
    """[L] thresholds: ``pick(thresholds, tps, fps, n_pos, n_neg)`` on each label's ROC steps over its
    known rows; 0.5 for a label without both classes (one warning naming them, ``what`` undefined)."""
    y, s, known = _as_2d(y_true, y_score)
    names = _names(y.shape[1])
    out, undefined = np.full(y.shape[1], 0.5), []
    for c in range(y.shape[1]):
        k = known[:, c]
        n_pos, n = int(y[:, c].sum()), int(k.sum())
        if n_pos in (0, n):
            undefined.append(names[c])
            continue
        thr, tps, fps = _binary_curve(y[k, c], s[k, c])
        out[c] = pick(thr, tps, fps, n_pos, n - n_pos)
    _warn(f"{what} undefined (0.5 used) for labels without both classes", undefined)
    return out


def calibrate(x, operating_point) -> np.ndarray:
    """SPEC's operating-point transform: x/(2o) for x <= o, else 1 - (1-x)/(2(1-o)).

    Maps [0, 1] monotonically onto [0, 1] with o -> 0.5. x: [n, L] or [n]
    probabilities; operating_point: scalar or [L], each strictly inside (0, 1).
    """
    x = np.asarray(x, dtype=np.float64)
    o = np.asarray(operating_point, dtype=np.float64)
    if not ((o > 0) & (o < 1)).all():
        raise CxrError(
            f"calibrate: operating points must lie strictly in (0, 1), got {o} — "
            f"tune them with tune_thresholds on validation data"
        )
    low = x / (2 * o)
    high = 1 - (1 - x) / (2 * (1 - o))
    return np.where(x <= o, low, high)


# ------------------------------------------------------------------ reports
def epoch_metrics(y_true, y_score, threshold=0.5, labels: Sequence[str] | None = None) -> dict[str, float]:
    """Flat scalars for the per-epoch training CSV.

    y_true, y_score: [n, L] validation labels and probabilities; threshold: scalar
    or [L]. Keys: ``mean_auroc``, ``auroc_<Label>`` per label, and macro
    ``recall, specificity, f1, ppv, npv`` plus ``hamming`` and ``exact_match``.
    """
    y, s, known = _as_2d(y_true, y_score)
    names = _names(y.shape[1], labels)
    masked = np.where(known, y, np.nan)
    auroc = per_label_auroc(masked, s)
    out = {"mean_auroc": _nanmean(auroc)}
    out.update({f"auroc_{name}": float(v) for name, v in zip(names, auroc)})
    tm = threshold_metrics(masked, s, threshold)
    out["recall"] = tm["macro"]["sensitivity"]
    for name in ("specificity", "f1", "ppv", "npv"):
        out[name] = tm["macro"][name]
    out["hamming"] = tm["hamming_loss"]
    out["exact_match"] = tm["exact_match"]
    return out


def _nanmean(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else float("nan")


def summary(y_true, y_score, thresholds, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per label plus ``macro`` and ``micro`` rows of every metric.

    Columns: n_pos, prevalence, auroc, auprc, threshold, sensitivity, specificity,
    ppv, npv, f1, hamming_loss, exact_match. Micro AUROC/AUPRC pool all (image,
    label) pairs (sklearn ``average="micro"``); Hamming loss and exact match are
    whole-matrix numbers, reported on the micro row and in ``df.attrs``.
    """
    y, s, known = _as_2d(y_true, y_score)
    names = _names(y.shape[1], labels)
    masked = np.where(known, y, np.nan)
    tm = threshold_metrics(masked, s, thresholds)
    rows = pd.DataFrame(index=pd.Index(names, name="label"))
    rows["n_pos"] = y.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows["prevalence"] = y.sum(axis=0) / known.sum(axis=0)  # over the images that know the label
    rows["auroc"] = per_label_auroc(masked, s)
    rows["auprc"] = per_label_auprc(masked, s)
    rows["threshold"] = tm["thresholds"]
    for name in RATIO_METRICS:
        rows[name] = tm[name]
    macro = {
        "n_pos": rows["n_pos"].sum(),
        "prevalence": y.sum() / max(int(known.sum()), 1),
        "auroc": _nanmean(rows["auroc"].to_numpy()),
        "auprc": _nanmean(rows["auprc"].to_numpy()),
        **tm["macro"],
    }
    flat_y, flat_s = y[known].reshape(-1, 1), s[known].reshape(-1, 1)  # the known (image, label) pairs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # already warned per label
        micro = {
            "n_pos": macro["n_pos"],
            "prevalence": macro["prevalence"],
            "auroc": float(per_label_auroc(flat_y, flat_s)[0]),
            "auprc": float(per_label_auprc(flat_y, flat_s)[0]),
            **tm["micro"],
            "hamming_loss": tm["hamming_loss"],
            "exact_match": tm["exact_match"],
        }
    table = pd.concat([rows, pd.DataFrame([macro, micro], index=["macro", "micro"])])
    table.index.name = "label"
    table.attrs.update(hamming_loss=tm["hamming_loss"], exact_match=tm["exact_match"])
    return table


# ------------------------------------------------------------------ operating points, intervals, groups
def threshold_for_target(y_true, y_score, metric: str, target: float) -> np.ndarray:
    """Per-label threshold reaching ``target`` sensitivity or specificity on these data (val).

    ``sensitivity``: the highest observed score t with TPR(s >= t) >= target (the most
    specific such rule); ``specificity``: the lowest t with TNR >= target (the most
    sensitive such rule). Returns [L]; a label without both classes gets 0.5 (one warning).
    """
    if metric not in ("sensitivity", "specificity") or not 0 < target <= 1:
        raise CxrError(f"threshold_for_target: {metric}={target} — use sensitivity/specificity and a target in (0, 1]")

    def pick(thr: np.ndarray, tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int) -> float:
        if metric == "sensitivity":  # tps grows as t falls: the first index reaching the target
            return thr[np.argmax(tps / n_pos >= target - 1e-12)]
        ok = np.flatnonzero(1 - fps / n_neg >= target - 1e-12)  # fps grows as t falls: the last index
        return thr[ok[-1]] if ok.size else np.nextafter(thr[0], np.inf)  # still meeting it (maybe none)

    return _per_label_threshold(y_true, y_score, pick, f"{metric} {target} threshold")


def wilson_interval(successes, trials, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion (= statsmodels proportion_confint
    method="wilson"); any shape; NaN where trials == 0."""
    from scipy.special import ndtri  # norm.ppf without importing scipy.stats (seconds on a busy machine)

    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    z = ndtri(1 - alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        center = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    low, high = center - half, center + half
    return np.where(n > 0, low, np.nan), np.where(n > 0, high, np.nan)
