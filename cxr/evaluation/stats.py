"""The metrics' uncertainty (SPEC.md): bootstrap resamples shared by every score set (images or
whole patients), percentile-bootstrap AUROC CIs, DeLong variances and tests (paired, and unpaired
for subgroups), the paired bootstrap of an AUROC difference and Holm's correction.

Same shapes and conventions as cxr.evaluation.metrics (the point metrics these build on);
numpy arrays in, plain numbers/arrays out, no I/O.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cxr.evaluation.metrics import UndefinedMetricWarning, _as_2d, _names, _undefined_auroc, per_label_auroc
from cxrbase.errors import CxrError


# ------------------------------------------------------------------ confidence intervals
def bootstrap_counts(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """How often each image is drawn in each bootstrap resample (n draws with replacement).

    Returns float32 [n, n_boot] (column b sums to n). Share one matrix across score
    sets of the same images so their CIs (and differences) use the same resamples.
    """
    rng = np.random.default_rng(seed)
    counts = np.empty((n, n_boot), dtype=np.float32)
    # Blocks of ~4M draws keep the scatter cache-friendly and the scratch memory small.
    block = max(1, min(n_boot, 2**22 // max(n, 1)))
    index_type = np.int32 if block * n < 2**31 else np.int64
    for b0 in range(0, n_boot, block):
        k = min(block, n_boot - b0)
        draws = rng.integers(0, n, size=(k, n), dtype=index_type)
        draws += (np.arange(k, dtype=index_type) * n)[:, None]
        counts[:, b0 : b0 + k] = np.bincount(draws.ravel(), minlength=k * n).reshape(k, n).T
    return counts


def _weighted_auroc(y: np.ndarray, s: np.ndarray, counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """AUROC of one label under each column of integer weights: [n] x [n, B] -> [B].

    totals: [B] float64 column sums of counts (shared by all labels).

    Weighted Mann-Whitney: sum over (positive i, negative j) of w_i w_j [s_i > s_j]
    (1/2 if tied), over W+ W-. With the positives' distinct scores u_1 < ... < u_m,
    A_t = negative weight below u_t plus half the weight tied at u_t and P_t =
    positive weight at u_t, the numerator is sum_t P_t A_t. Both are linear in the
    weights: one sparse [2m, n] matrix times counts gives P and the increments of A
    (each negative enters at most two rows), then a cumulative sum over t. With
    integer counts (column sums below ~4 million) every float32 value here is an
    exact integer or half-integer and the final sum runs in float64: the result
    is exact. Cost O(n B) per label, no loop over resamples.
    """
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    u = np.unique(s[pos])
    m = u.size
    t = np.searchsorted(u, s[neg])
    tied = (t < m) & (u[np.minimum(t, m - 1)] == s[neg])
    below = (t < m) & ~tied
    carry = tied & (t + 1 < m)  # the other half of a tie counts for all higher u_t
    rows = np.concatenate([t[below], t[tied], t[carry] + 1, m + np.searchsorted(u, s[pos])])
    cols = np.concatenate([neg[below], neg[tied], neg[carry], pos])
    vals = np.concatenate(
        [np.ones(below.sum()), np.full(tied.sum(), 0.5), np.full(carry.sum(), 0.5), np.ones(pos.size)]
    ).astype(counts.dtype)
    stacked = sp.csr_matrix((vals, (rows, cols)), shape=(2 * m, y.size)) @ counts
    below_weight, pos_weight = stacked[:m], stacked[m:]
    # In-place running sum over the m score groups (not over resamples): each step
    # is one contiguous row add, ~4x faster than np.cumsum(axis=0) on [m, B].
    for i in range(1, m):
        np.add(below_weight[i], below_weight[i - 1], out=below_weight[i])
    numerator = np.einsum("tb,tb->b", pos_weight, below_weight, dtype=np.float64)
    w_pos = pos_weight.sum(axis=0, dtype=np.float64)
    w_neg = totals - w_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w_pos > 0) & (w_neg > 0), numerator / (w_pos * w_neg), np.nan)


def _bootstrap_one(y: np.ndarray, s: np.ndarray, known: np.ndarray, counts: np.ndarray, alpha: float) -> dict:
    """Bootstrap AUROC CIs of one score set against shared resample counts (a label with unknown
    entries: the resample weights of the images that know it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # warned once by the caller
        auroc = per_label_auroc(np.where(known, y, np.nan), s)
    defined = ~np.isnan(auroc)
    samples = np.full((counts.shape[1], y.shape[1]), np.nan)
    totals = counts.sum(axis=0, dtype=np.float64)
    for c in np.flatnonzero(defined):
        k = known[:, c]
        if k.all():
            samples[:, c] = _weighted_auroc(y[:, c], s[:, c], counts, totals)
        else:
            mine = counts[k]
            samples[:, c] = _weighted_auroc(y[k, c], s[k, c], mine, mine.sum(axis=0, dtype=np.float64))
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    out = {"auroc": auroc, "n_boot": counts.shape[1], "alpha": alpha, "samples": samples}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns of undefined labels
        out["ci_low"], out["ci_high"] = np.nanpercentile(samples, q, axis=0)
        out["std"] = np.nanstd(samples, axis=0, ddof=1)
    # Per-label-mean bootstrap: a resample's mean AUROC is the mean over the labels defined in
    # that resample. Requiring every label to keep a positive (the joint mean) would condition on
    # resamples that keep the rarest positives, and with a label of 1-2 positives keep only a few
    # percent of them: a biased interval that can exclude the estimate.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no defined label: NaN
        mean_samples = np.nanmean(samples[:, defined], axis=1) if defined.any() else samples[:, 0]
    out["mean_auroc"] = float(auroc[defined].mean()) if defined.any() else float("nan")
    out["mean_samples"] = mean_samples
    out["n_valid_labels"] = np.isfinite(samples).sum(axis=0)  # [L] resamples where each label is defined
    out["n_valid_all"] = int(np.isfinite(samples[:, defined]).all(axis=1).sum()) if defined.any() else 0
    out["n_valid"] = int(np.isfinite(mean_samples).sum())
    if out["n_valid"]:
        out["mean_ci_low"], out["mean_ci_high"] = (float(v) for v in np.nanpercentile(mean_samples, q))
    else:
        out["mean_ci_low"] = out["mean_ci_high"] = float("nan")
    return out


def bootstrap_auroc(
    y_true, y_score, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, counts: np.ndarray | None = None
):
    """Percentile bootstrap CIs (over images) for per-label and mean AUROC.

    y_true: [n, L]; y_score: [n, L], or a list of such score sets (ensemble members),
    which are then all evaluated on the SAME resamples. counts: optional
    [n, n_boot] resample counts (:func:`bootstrap_counts`); else drawn from seed.
    Every resample uses the same images for all labels; a resample's mean AUROC is the
    mean over the labels defined in it (both classes drawn), so a rare label missing its
    positives does not drop the resample (see _bootstrap_one). Returns a dict (a list of dicts
    for a list of score sets): ``auroc, ci_low, ci_high, std`` [L]; ``mean_auroc,
    mean_ci_low, mean_ci_high``; ``samples`` [n_boot, L], ``mean_samples`` [n_boot];
    ``n_boot, alpha``; ``n_valid`` (resamples with a mean), ``n_valid_labels`` [L] (resamples
    where each label is defined), ``n_valid_all`` (resamples where every defined label is).
    Labels with undefined AUROC give NaN everywhere and are left out of the mean.
    """
    many = isinstance(y_score, (list, tuple))
    score_sets = list(y_score) if many else [y_score]
    if not 0 < alpha < 1:
        raise CxrError(f"bootstrap_auroc: alpha={alpha} — use a value in (0, 1), e.g. 0.05 for 95 % CIs")
    y, _, known = _as_2d(y_true, score_sets[0])
    _undefined_auroc(y, known, _names(y.shape[1]))
    if counts is None:
        counts = bootstrap_counts(y.shape[0], n_boot, seed)
    elif counts.ndim != 2 or counts.shape[0] != y.shape[0]:
        raise CxrError(
            f"bootstrap_auroc: counts {counts.shape} do not match {y.shape[0]} images — "
            f"build them with bootstrap_counts(n_images, n_boot)"
        )
    elif counts.dtype not in (np.float32, np.float64):
        counts = counts.astype(np.float32)  # integer counts: exact in float32, and the 1/2 of ties fits
    results = [_bootstrap_one(*_as_2d(y_true, s), counts, alpha) for s in score_sets]
    return results if many else results[0]


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    _, inverse, tie_counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(tie_counts)
    return (upper - (tie_counts - 1) / 2.0)[inverse]


def delong_auroc_variance(y_true, y_score) -> np.ndarray:
    """DeLong (1988) variance of each label's AUROC, by Sun & Xu's (2014) midrank algorithm.

    y_true, y_score: [n, L]. Returns [L] variances (NaN where AUROC is undefined);
    O(n log n) per label. var = var(V10)/m + var(V01)/k with the structural
    components V10 (m positives) and V01 (k negatives), sample variances (ddof 1).
    """
    y, s, known = _as_2d(y_true, y_score)
    undefined = _undefined_auroc(y, known, _names(y.shape[1]))
    out = np.full(y.shape[1], np.nan)
    for c in np.flatnonzero(~undefined):
        pos, neg = s[y[:, c], c], s[~y[:, c] & known[:, c], c]
        m, k = pos.size, neg.size
        combined = _midranks(np.r_[pos, neg])
        v10 = (combined[:m] - _midranks(pos)) / k
        v01 = 1.0 - (combined[m:] - _midranks(neg)) / m
        var10 = v10.var(ddof=1) if m > 1 else 0.0
        var01 = v01.var(ddof=1) if k > 1 else 0.0
        out[c] = var10 / m + var01 / k
    return out


# ------------------------------------------------------------------ comparing two models
def _delong_components(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Structural components of one model: V10 [m] over positives, V01 [n] over negatives.

    Sun & Xu (2014): with midranks Tz of all m + n scores, Tx of the positives and Ty of
    the negatives, V10_i = (Tz_i − Tx_i) / n and V01_j = 1 − (Tz_{m+j} − Ty_j) / m —
    the counts of SPEC.md's ψ sums read off ranks in O((m+n) log(m+n)).
    """
    m, n = pos.size, neg.size
    combined = _midranks(np.r_[pos, neg])
    v10 = (combined[:m] - _midranks(pos)) / n
    v01 = 1.0 - (combined[m:] - _midranks(neg)) / m
    return v10, v01


def paired_delong(y_true, score_1, score_2) -> dict[str, float]:
    """DeLong's test of two correlated AUROCs on the same images (one label), SPEC.md form.

    y_true: [N] 0/1; score_1, score_2: [N] scores of two models on the same images.
    Returns ``auc_1, auc_2, delta`` (auc_1 − auc_2), ``var`` of the difference, ``z`` and
    two-sided ``p``. Fast midrank form (Sun & Xu 2014), equal to the O(m·n) ψ definition.
    Undefined (no positives or no negatives): everything NaN. Zero variance (identical
    rankings): z = 0 and p = 1 when delta = 0, else z = ±inf and p = 0.
    """
    from scipy.stats import norm

    raw = np.asarray(y_true, np.float64).ravel()
    s1, s2 = np.asarray(score_1, np.float64).ravel(), np.asarray(score_2, np.float64).ravel()
    if not (raw.size == s1.size == s2.size):
        raise CxrError(
            f"paired_delong: {raw.size} labels vs {s1.size} and {s2.size} scores — both models must score the same images"
        )
    keep = ~np.isnan(raw)  # unknown labels: left out
    y, s1, s2 = raw[keep].astype(bool), s1[keep], s2[keep]
    m, n = int(y.sum()), int((~y).sum())
    nan = float("nan")
    if m == 0 or n == 0:
        return {"auc_1": nan, "auc_2": nan, "delta": nan, "var": nan, "z": nan, "p": nan}
    v10_1, v01_1 = _delong_components(s1[y], s1[~y])
    v10_2, v01_2 = _delong_components(s2[y], s2[~y])
    auc_1, auc_2 = float(v10_1.mean()), float(v10_2.mean())
    s10 = np.cov(np.stack([v10_1, v10_2]), ddof=1) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.stack([v01_1, v01_2]), ddof=1) if n > 1 else np.zeros((2, 2))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    delta = auc_1 - auc_2
    if var <= 1e-15:
        z = 0.0 if abs(delta) < 1e-12 else float(np.sign(delta) * np.inf)
    else:
        z = delta / float(np.sqrt(var))
    return {
        "auc_1": auc_1,
        "auc_2": auc_2,
        "delta": delta,
        "var": float(max(var, 0.0)),
        "z": z,
        "p": float(2 * norm.sf(abs(z))),
    }


def paired_bootstrap_delta(
    y_true, score_1, score_2, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, counts: np.ndarray | None = None
) -> dict:
    """Percentile CI of AUROC(score_1) − AUROC(score_2) per label, both on the SAME resamples.

    y_true, score_1, score_2: [N, L]. Each replicate draws the images once
    (:func:`bootstrap_counts`) and both models are scored on that draw, so the
    correlation between them is kept. Returns ``delta`` [L] (on all images),
    ``ci_low, ci_high`` [L], ``samples`` [n_boot, L] and ``mean_delta, mean_ci_low,
    mean_ci_high`` for the macro mean.
    """
    first, second = bootstrap_auroc(y_true, [score_1, score_2], n_boot=n_boot, seed=seed, alpha=alpha, counts=counts)
    samples = first["samples"] - second["samples"]
    mean_samples = first["mean_samples"] - second["mean_samples"]
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined labels: all-NaN columns
        low, high = np.nanpercentile(samples, q, axis=0)
        mean_low, mean_high = np.nanpercentile(mean_samples, q) if np.isfinite(mean_samples).any() else (np.nan,) * 2
    return {
        "delta": first["auroc"] - second["auroc"],
        "ci_low": low,
        "ci_high": high,
        "samples": samples,
        "mean_delta": first["mean_auroc"] - second["mean_auroc"],
        "mean_ci_low": float(mean_low),
        "mean_ci_high": float(mean_high),
        "n_boot": int(samples.shape[0]),
        "alpha": alpha,
    }


def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values; NaN entries stay NaN and are not counted.

    p_values: [k]. With the defined p sorted ascending p_(1) ≤ … ≤ p_(k),
    adjusted p_(i) = max over j ≤ i of min(1, (k − j + 1) p_(j)); reject where adjusted < alpha.
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    defined = np.flatnonzero(np.isfinite(p))
    k = defined.size
    if k == 0:
        return out
    order = defined[np.argsort(p[defined], kind="stable")]
    scaled = np.minimum(1.0, (k - np.arange(k)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def unpaired_delong(y_1, score_1, y_2, score_2) -> dict[str, float]:
    """DeLong test of two AUROCs on DISJOINT image sets (subgroups): z = (A1 − A2) / sqrt(V1 + V2)
    with each V the DeLong variance of its own set (the sets are independent, no covariance).

    Returns ``auc_1, auc_2, delta, var, z, p``; NaN everywhere when either AUROC is undefined.
    """
    from scipy.special import ndtr

    nan = float("nan")
    parts = []
    for y, s in ((y_1, score_1), (y_2, score_2)):
        raw = np.asarray(y, dtype=np.float64).ravel()
        keep = ~np.isnan(raw)  # unknown labels: left out
        y = raw[keep].astype(bool)
        s = np.asarray(s, dtype=np.float64).ravel()[keep]
        if y.sum() in (0, y.size):
            return {"auc_1": nan, "auc_2": nan, "delta": nan, "var": nan, "z": nan, "p": nan}
        v10, v01 = _delong_components(s[y], s[~y])
        var = (v10.var(ddof=1) / v10.size if v10.size > 1 else 0.0) + (
            v01.var(ddof=1) / v01.size if v01.size > 1 else 0.0
        )
        parts.append((float(v10.mean()), float(var)))
    (a1, v1), (a2, v2) = parts
    delta, var = a1 - a2, v1 + v2
    z = (0.0 if abs(delta) < 1e-12 else float(np.sign(delta) * np.inf)) if var <= 1e-15 else delta / np.sqrt(var)
    return {"auc_1": a1, "auc_2": a2, "delta": delta, "var": var, "z": float(z), "p": float(2 * ndtr(-abs(z)))}


class Resamples:
    """Bootstrap resamples of images or of whole patients, shared by every analysis of a split.

    ``units`` [n] names the resampling unit of each image (a patient id, or None: each image
    its own unit). Each resample draws as many units as there are, with replacement;
    ``unit_counts`` [U, B] holds how often each unit is drawn (:func:`bootstrap_counts` over
    units) and an image's weight is its unit's count, so a patient's images come and go
    together. ``counts`` [n, B] (float32) is that image weight matrix (what
    :func:`bootstrap_auroc` takes); :meth:`sums` gives resample-weighted column sums of any
    per-image values through the unit totals (one [B, U] × [U, k] product).
    """

    def __init__(self, n: int, n_boot: int, seed: int = 0, units=None) -> None:
        if units is None:
            self.inverse, self.level = np.arange(n), "image"
        else:
            units = np.asarray(units)
            if units.shape != (n,) or pd.isna(units).any():
                raise CxrError(
                    f"resamples: {units.shape} patient ids for {n} images (or missing ids) — "
                    "the splits table must give every image a patient"
                )
            _, self.inverse = np.unique(units, return_inverse=True)
            self.level = "patient"
        self.n, self.n_boot, self.n_units = n, n_boot, int(self.inverse.max()) + 1
        self.unit_counts = bootstrap_counts(self.n_units, n_boot, seed)
        self._counts: np.ndarray | None = None
        self._aggregate = (
            None
            if self.level == "image"
            else sp.csr_matrix((np.ones(n, dtype=np.float32), (self.inverse, np.arange(n))), shape=(self.n_units, n))
        )

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            self._counts = self.unit_counts if self.level == "image" else self.unit_counts[self.inverse]
        return self._counts

    def sums(self, values: np.ndarray) -> np.ndarray:
        """[B, k] resample-weighted sums of per-image ``values`` [n, k] (float64 out)."""
        values = np.asarray(values, dtype=np.float64).reshape(self.n, -1)
        per_unit = values if self._aggregate is None else self._aggregate @ values
        return (self.unit_counts.T @ per_unit.astype(np.float32)).astype(np.float64)
