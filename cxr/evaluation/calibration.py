"""Calibration: ECE, reliability bins, Brier score and its decomposition, temperature and
Platt scaling — and the report folder's ``calibration.json`` (this module is its one owner).

Numpy in, numbers out; no plotting. Shapes as in :mod:`cxr.evaluation.metrics`: ``y`` [n, L] 0/1,
``p`` [n, L] probabilities (a 1-D input is one label).

Binning (``n_bins`` = 15 by default):

- ``width``: equal-width bins on [0, 1]; a probability on an edge goes to the upper bin
  and 1.0 to the last (torchmetrics' ``BinaryCalibrationError`` convention);
- ``mass``: equal-mass bins whose edges are the quantiles of the scores (numpy's linear
  percentile); a probability on an edge goes to the lower bin (scikit-learn's
  ``calibration_curve(strategy="quantile")`` convention).

ECE = sum_b (n_b / n) |mean(y in b) − mean(p in b)|. Brier = mean (p − y)²; its Murphy
decomposition on the equal-width bins is reliability − resolution + uncertainty with
REL = sum_b n_b (p̄_b − ȳ_b)² / n, RES = sum_b n_b (ȳ_b − ȳ)² / n, UNC = ȳ (1 − ȳ); the
identity Brier = REL − RES + UNC is exact when the scores are constant within each bin
(otherwise the within-bin spread of p is left out, as in every binned decomposition).

Post-hoc calibration, per label, on the logit x = log(p / (1 − p)) (p clipped to
[1e-7, 1 − 1e-7]): temperature p' = σ(x / T) and Platt p' = σ(a x + b), both fitted by
maximum likelihood (log-loss) with scipy's L-BFGS-B and the slope kept positive, so both
maps are strictly increasing and AUROC is unchanged. Which one a label uses is chosen by
5-fold cross-validated log-loss on the tuning split among ``none`` (identity),
``temperature`` and ``platt`` (on the fitting data itself Platt can never lose to
temperature, which is its b = 0 case, so an in-sample choice would always pick it); the
chosen map is then refitted on the whole tuning split.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError

N_BINS = 15
EPS = 1e-7
METHODS = ("none", "temperature", "platt")
CALIBRATION_FILE = "calibration.json"
_SLOPE_BOUNDS = (1e-4, 1e4)


def _2d(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    p = p[:, None] if p.ndim == 1 else p
    if y.shape != p.shape or y.shape[0] == 0:
        raise CxrError(
            f"calibration: labels {y.shape} and probabilities {p.shape} must be equal, non-empty "
            "[n, L] arrays — pass one row per image, one column per label"
        )
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise CxrError("calibration: scores must be probabilities in [0, 1] — check the model outputs")
    # column-major: every per-label sum runs over contiguous memory in one order, so the numbers do not
    # depend on how the caller's array is laid out (fresh inference vs. read back from parquet)
    return np.asfortranarray(y), np.asfortranarray(p)


# ------------------------------------------------------------------- binning ---


def bin_edges(p: np.ndarray, n_bins: int = N_BINS, strategy: str = "width") -> np.ndarray:
    """[n_bins + 1] edges of one label's scores ``p`` [n]: equal width on [0, 1] or quantiles."""
    if strategy == "width":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "mass":
        return np.percentile(p, np.linspace(0, 100, n_bins + 1))
    raise CxrError(f"calibration: strategy={strategy!r} — choose 'width' or 'mass'")


def bin_index(p: np.ndarray, edges: np.ndarray, strategy: str = "width") -> np.ndarray:
    """Bin of each score [n] in 0 .. len(edges) − 2 (edge conventions in the module doc)."""
    n_bins = edges.size - 1
    if strategy == "width":  # floor(n_bins p): the upper bin on an edge, 1.0 in the last
        return np.minimum((np.asarray(p) * n_bins).astype(np.int64), n_bins - 1)
    return np.searchsorted(edges[1:-1], p, side="left")


def reliability_bins(y, p, n_bins: int = N_BINS, strategy: str = "width") -> dict[str, np.ndarray]:
    """One label's bins: ``count``, ``mean_p`` (mean score) and ``freq`` (fraction positive),
    each [n_bins] (NaN means for empty bins), and ``edges`` [n_bins + 1]."""
    y, p = _2d(y, p)
    y, p = y[:, 0], p[:, 0]
    known = ~np.isnan(y)  # unknown labels (masked) are left out
    y, p = y[known], p[known]
    edges = bin_edges(p, n_bins, strategy)
    idx = bin_index(p, edges, strategy)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, p, minlength=n_bins) / count
        freq = np.bincount(idx, y, minlength=n_bins) / count
    return {"count": count, "mean_p": mean_p, "freq": freq, "edges": edges}


def ece(y, p, n_bins: int = N_BINS, strategy: str = "width") -> np.ndarray:
    """Expected calibration error per label [L] (see the module doc for the bins)."""
    y, p = _2d(y, p)
    out = np.empty(y.shape[1])
    for c in range(y.shape[1]):
        k = ~np.isnan(y[:, c])  # unknown labels (masked) are left out
        yc, pc = (y[:, c], p[:, c]) if k.all() else (y[k, c], p[k, c])
        if yc.size == 0:
            out[c] = np.nan
            continue
        edges = bin_edges(pc, n_bins, strategy)
        idx = bin_index(pc, edges, strategy)
        gap = np.bincount(idx, yc - pc, minlength=n_bins)
        out[c] = np.abs(gap).sum() / yc.size
    return out


def brier(y, p) -> np.ndarray:
    """Brier score per label [L]: mean (p − y)² (= sklearn brier_score_loss)."""
    y, p = _2d(y, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a label no image knows: NaN
        return np.nanmean((p - y) ** 2, axis=0)  # unknown (NaN) labels left out


def brier_decomposition(y, p, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Murphy's reliability, resolution and uncertainty per label [L] on equal-width bins."""
    y, p = _2d(y, p)
    out = {k: np.empty(y.shape[1]) for k in ("reliability", "resolution", "uncertainty")}
    for c in range(y.shape[1]):
        b = reliability_bins(y[:, c], p[:, c], n_bins, "width")  # known entries only
        n = max(b["count"].sum(), 1.0)
        full = b["count"] > 0
        base = np.nanmean(y[:, c]) if full.any() else np.nan
        out["reliability"][c] = np.sum(b["count"][full] * (b["mean_p"][full] - b["freq"][full]) ** 2) / n
        out["resolution"][c] = np.sum(b["count"][full] * (b["freq"][full] - base) ** 2) / n
        out["uncertainty"][c] = base * (1 - base)
    return out


def log_loss(y, p) -> np.ndarray:
    """Mean binary cross-entropy per label [L], p clipped to [EPS, 1 − EPS]."""
    y, p = _2d(y, p)
    p = np.clip(p, EPS, 1 - EPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a label no image knows: NaN
        return -np.nanmean(y * np.log(p) + (1 - y) * np.log1p(-p), axis=0)  # unknown (NaN) left out


# ------------------------------------------------------------------- fitting ---


def logit(p) -> np.ndarray:
    """log(p / (1 − p)) with p clipped to [EPS, 1 − EPS] (finite for 0 and 1)."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(z)


def _fit(x: np.ndarray, y: np.ndarray, with_bias: bool) -> tuple[float, float]:
    """(a, b) minimising the log-loss of σ(a x + b) (b = 0 unless with_bias), a in _SLOPE_BOUNDS.

    Newton's method with step halving on this 1- or 2-parameter convex problem (logistic
    regression on one feature, i.e. IRLS), projected on the slope's bounds: where the slope sits
    on a bound and the loss would take it beyond (scores ranking the positives lowest, as on a small
    val split), it is held there and the intercept alone is fitted. Hand-written rather than
    scipy.optimize because the evaluator fits ~1,000 such maps per report (members × labels ×
    cross-validation folds) and L-BFGS-B's per-call overhead made that ~100× slower; the tests check
    the optimum against independent scipy / scikit-learn fits, on a bound too.
    """
    k = 2 if with_bias else 1
    design = np.column_stack([x, np.ones_like(x)])[:, :k]
    low, high = _SLOPE_BOUNDS

    def loss(theta: np.ndarray) -> float:
        z = design @ theta
        return float(np.sum(np.logaddexp(0.0, z) - y * z))

    theta = np.array([1.0, 0.0])[:k]
    value = loss(theta)
    for _ in range(100):
        prob = _sigmoid(design @ theta)
        grad = design.T @ (prob - y)
        hess = (design * (prob * (1 - prob))[:, None]).T @ design + 1e-12 * np.eye(k)
        free = np.ones(k, dtype=bool)  # the slope is held where it is on a bound the loss pushes against
        free[0] = not ((theta[0] <= low and grad[0] > 0) or (theta[0] >= high and grad[0] < 0))
        if not free.any():
            break
        step = np.zeros(k)
        step[free] = np.linalg.solve(hess[np.ix_(free, free)], grad[free])
        rounding = 1e-12 * max(1.0, abs(value))
        t = 1.0
        while True:
            candidate = theta - t * step
            candidate[0] = np.clip(candidate[0], low, high)
            new = loss(candidate)
            if new <= value + rounding or t < 1e-8:
                break
            t /= 2
        if new > value + rounding:
            break  # no decrease along the step: theta is the optimum to rounding
        converged = abs(value - new) <= rounding
        theta, value = candidate, min(new, value)
        if converged:
            break
    return float(theta[0]), float(theta[1]) if with_bias else 0.0


def fit_temperature(y, p) -> float:
    """Temperature T of one label minimising the log-loss of σ(logit(p) / T) on (y, p) [n]."""
    a, _ = _fit(logit(np.ravel(p)), np.ravel(np.asarray(y, dtype=np.float64)), with_bias=False)
    return 1.0 / a


def fit_platt(y, p) -> tuple[float, float]:
    """Platt (a, b) of one label minimising the log-loss of σ(a logit(p) + b) on (y, p) [n]."""
    return _fit(logit(np.ravel(p)), np.ravel(np.asarray(y, dtype=np.float64)), with_bias=True)


def apply_map(p, params: dict[str, Any]) -> np.ndarray:
    """Apply one label's fitted map (a calibration.json label entry) to probabilities p [n]."""
    method = params["method"]
    if method == "none":
        return np.asarray(p, dtype=np.float64)
    if method == "temperature":
        return _sigmoid(logit(p) / params["temperature"])
    if method == "platt":
        return _sigmoid(params["a"] * logit(p) + params["b"])
    raise CxrError(f"calibration: unknown method {method!r} — one of {METHODS}")


def _nll(x: np.ndarray, y: np.ndarray, a: float, b: float) -> float:
    z = a * x + b
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _folds(n: int, groups: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """Fold of each row [n] in 0..k−1: whole groups (patients) per fold when given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.permutation(n) % k
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    return rng.permutation(inverse.max() + 1)[inverse] % k


def fit_label(y, p, groups: np.ndarray | None = None, k: int = 5, seed: int = 0) -> dict[str, Any]:
    """Fit temperature and Platt to one label (y, p [n]) and choose among none / temperature /
    platt by k-fold cross-validated log-loss (folds by ``groups`` when given); returns a
    calibration.json label entry."""
    y = np.ravel(np.asarray(y, dtype=np.float64))
    x = logit(np.ravel(p))
    known = ~np.isnan(y)  # unknown labels (masked) take no part in the fit
    if not known.all():
        y, x = y[known], x[known]
        groups = None if groups is None else np.asarray(groups)[known]
    if y.size == 0:
        nan = float("nan")
        return {
            "temperature": 1.0,
            "a": 1.0,
            "b": 0.0,
            "n": 0,
            "n_pos": 0,
            "method": "none",
            "cv_logloss": dict.fromkeys(METHODS, nan),
        }
    temp_a, _ = _fit(x, y, False)
    platt_a, platt_b = _fit(x, y, True)
    entry: dict[str, Any] = {
        "temperature": 1.0 / temp_a,
        "a": platt_a,
        "b": platt_b,
        "n": int(y.size),
        "n_pos": int(y.sum()),
    }
    if y.sum() in (0, y.size):  # one class only: no map can be checked; keep the scores
        entry.update(method="none", cv_logloss=dict.fromkeys(METHODS, float("nan")))
        return entry
    fold = _folds(y.size, groups, k, seed)
    cv = dict.fromkeys(METHODS, 0.0)
    for f in range(k):
        test, train = fold == f, fold != f
        if not test.any() or y[train].sum() in (0, train.sum()):
            continue
        ta, _ = _fit(x[train], y[train], False)
        pa, pb = _fit(x[train], y[train], True)
        w = test.sum() / y.size
        cv["none"] += w * _nll(x[test], y[test], 1.0, 0.0)
        cv["temperature"] += w * _nll(x[test], y[test], ta, 0.0)
        cv["platt"] += w * _nll(x[test], y[test], pa, pb)
    entry["cv_logloss"] = cv
    entry["method"] = min(METHODS, key=lambda m: cv[m])  # ties: the simpler map (METHODS order)
    return entry


def fit_calibration(
    y, p, labels: Sequence[str], groups: np.ndarray | None = None, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """{label: entry} for every column of (y, p) [n, L] (see :func:`fit_label`)."""
    y, p = _2d(y, p)
    return {label: fit_label(y[:, c], p[:, c], groups, seed=seed) for c, label in enumerate(labels)}


def apply_calibration(
    p, maps: dict[str, dict[str, Any]], labels: Sequence[str], method: str | None = None
) -> np.ndarray:
    """Calibrated probabilities [n, L]: each label's chosen map, or ``method`` for all."""
    p = np.asarray(p, dtype=np.float64)
    out = np.empty_like(p)
    for c, label in enumerate(labels):
        entry = maps[label]
        out[:, c] = apply_map(p[:, c], {**entry, "method": method or entry["method"]})
    return out


# ---------------------------------------------------------- calibration.json ---


def calibration_document(maps: dict[str, dict[str, Any]], member: str, split: str, n: int) -> dict[str, Any]:
    """The calibration.json document (fitted maps of one score set)."""
    return {
        "member": member,
        "fitted_on": split,
        "n_images": n,
        "maps": {"none": "p", "temperature": "sigmoid(logit(p) / temperature)", "platt": "sigmoid(a * logit(p) + b)"},
        "logit": f"log(p / (1 - p)), p clipped to [{EPS:g}, 1 - {EPS:g}]",
        "clip": EPS,
        "fitted_by": "python -m cxr.evaluate (maximum likelihood on the fitting split's labels)",
        "choice": "per label, lowest 5-fold cross-validated log-loss on the fitting split",
        "labels": maps,
    }


def _strict(value: Any) -> Any:
    """NaN/±inf → None, recursively: the file is read by browsers (JSON.parse has no NaN)."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_calibration(out: Path, document: dict[str, Any]) -> Path:
    """OUT/calibration.json, atomically, as strict JSON (an undefined number, e.g. the cross-validated
    log-loss of a label with one class only, is written as null)."""
    path = Path(out) / CALIBRATION_FILE
    atomic_write_text(path, json.dumps(_strict(document), indent=2, allow_nan=False) + "\n")
    return path


def read_calibration(path: str | Path) -> dict[str, Any]:
    """A calibration.json written by the evaluator (validated: every label has a known method)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CxrError(
            f"{path}: unreadable calibration ({err}) — pass REPORT/calibration.json written by python -m cxr.evaluate"
        ) from None
    maps = doc.get("labels") if isinstance(doc, dict) else None
    if not isinstance(maps, dict) or any(
        not isinstance(e, dict) or e.get("method") not in METHODS for e in maps.values()
    ):
        raise CxrError(
            f"{path}: not an evaluator calibration.json (labels with a method in {METHODS}) — "
            "re-run python -m cxr.evaluate"
        )
    return doc


# ------------------------------------------------------- deployment (export, page, cxr-predict) ---


def beside(thresholds: str | Path | None) -> Path | None:
    """The calibration.json the evaluator wrote next to ``thresholds`` (its report folder), if any:
    what cxr.tools.export and cxr-predict use by default with ``--thresholds``."""
    if thresholds is None:
        return None
    path = Path(thresholds).parent / CALIBRATION_FILE
    return path if path.is_file() else None


def calibration_for(path: str | Path, members: Sequence[str] | None, labels: Sequence[str]) -> dict[str, Any]:
    """read_calibration(path), checked to be the maps of one of the score sets ``members`` (None: any)
    with an entry for every one of ``labels``. For several runs that is ``ensemble``; for one run its
    name or ``ensemble`` (the evaluator's ensemble of one run is that run's probabilities)."""
    doc = read_calibration(path)
    if members is not None and doc.get("member") not in members:
        raise CxrError(
            f"{path}: maps fitted for score set {doc.get('member')!r}, not {' or '.join(map(repr, members))} — pass "
            "the calibration.json of these runs' report (python -m cxr.evaluate --runs … --thresholds-from val)"
        )
    missing = [label for label in labels if label not in doc["labels"]]
    if missing:
        raise CxrError(f"{path}: no map for {missing[:3]} — pass the calibration.json of these runs' report")
    return doc


def calibrated(p, doc: dict[str, Any], labels: Sequence[str]) -> np.ndarray:
    """Probabilities [n, L] through each label's chosen map of a calibration.json document."""
    return apply_calibration(np.atleast_2d(np.asarray(p, dtype=np.float64)), doc["labels"], labels)


def describe(doc: dict[str, Any]) -> str:
    """One line: which maps, fitted on which split, for which score set (legend, summaries, metadata)."""
    counts: dict[str, int] = {}
    for entry in doc["labels"].values():
        counts[entry["method"]] = counts.get(entry["method"], 0) + 1
    used = ", ".join(f"{m} {counts[m]}" for m in METHODS if m in counts)
    return (
        f"calibrated by the evaluator's maps ({used} of {len(doc['labels'])} labels) fitted on "
        f"'{doc.get('fitted_on') or '?'}' ({doc.get('n_images', '?')} images) for score set '{doc.get('member')}'"
    )
