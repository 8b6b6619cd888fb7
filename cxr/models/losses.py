"""Multi-label losses of SPEC.md, on logits: pure tensor functions, no I/O.

Shapes: ``logits`` and ``targets`` are ``[B, C]`` (targets 0/1, any float dtype);
every loss returns a scalar, the mean over batch and labels. p = sigmoid(z).

Numerics: log p and log(1 - p) are taken as ``logsigmoid(z)`` and
``logsigmoid(-z)``, exact for any logit, where the reference implementations
clip p to [eps, 1 - eps]. Where the clip is inactive the two agree to rounding
(tested); where it is active the clipped form has zero gradient (a saturated,
confidently wrong logit stops learning) and ours keeps the true, finite one.
Losses run in at least float32 even when the logits are bf16/fp16 (autocast),
because the batch statistics and weights need the precision.

Label smoothing (option of every loss): y <- y (1 - a) + a / 2 before the loss.

Unknown labels: a NaN target (the loaders' unknown, `.labels` byte 255) is masked. Every loss
then averages over the known entries only (the mean over [B, C] becomes the sum of the known
terms over their count; 0 with a zero gradient when a batch knows none), and the dynamic
weights' batch positive ratio r_c counts only the images that know label c. A batch without
NaN gives exactly the unmasked losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cxrbase.errors import CxrError

LOSS_NAMES = ("bce", "weighted_bce", "dynamic_weighted_bce", "focal", "ssim_recon")
WEIGHTINGS = ("linear", "log")
BATCH_STATS = ("rank", "global")


def _prepare(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check shapes and cast both to a float type of at least float32; split off the mask.

    Returns (logits, targets with unknown (NaN) entries set to 0, known mask or None when every
    entry is known)."""
    if logits.shape != targets.shape:
        raise CxrError(
            f"loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ "
            f"— the model must output one logit per label"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z, y = logits.to(dtype), targets.to(dtype)
    unknown = torch.isnan(y)
    if not bool(unknown.any()):
        return z, y, None
    return z, torch.where(unknown, torch.zeros_like(y), y), ~unknown


def _mean(terms: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    """Mean of the per-entry loss terms over the known entries (all of them when known is None)."""
    if known is None:
        return terms.mean()
    kept = torch.where(known, terms, torch.zeros_like(terms))  # where, not *: a masked inf/NaN term stays out
    return kept.sum() / known.sum().clamp(min=1).to(terms.dtype)


def smooth_labels(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """y (1 - a) + a / 2: pulls hard 0/1 targets towards 0.5 by a."""
    if not 0.0 <= label_smoothing < 1.0:
        raise CxrError(f"loss: label_smoothing={label_smoothing} — use a value in [0, 1), e.g. 0.05")
    if label_smoothing == 0.0:
        return targets
    return targets * (1.0 - label_smoothing) + 0.5 * label_smoothing


def bce(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy, mean of -[y log p + (1-y) log(1-p)] over [B, C]."""
    z, y, known = _prepare(logits, targets)
    if known is None:
        return F.binary_cross_entropy_with_logits(z, smooth_labels(y, label_smoothing))
    return _mean(F.binary_cross_entropy_with_logits(z, smooth_labels(y, label_smoothing), reduction="none"), known)


def weighted_bce(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Class-weighted BCE, mean of -[w_c y log p + (1-y) log(1-p)] over [B, C].

    pos_weight: [C] positive weights (tensor or array), e.g. from :func:`positive_weights`.
    """
    z, y, known = _prepare(logits, targets)
    w = torch.as_tensor(pos_weight, dtype=z.dtype, device=z.device)
    if known is None:
        return F.binary_cross_entropy_with_logits(z, smooth_labels(y, label_smoothing), pos_weight=w)
    terms = F.binary_cross_entropy_with_logits(z, smooth_labels(y, label_smoothing), pos_weight=w, reduction="none")
    return _mean(terms, known)


def positive_weights(prevalence: np.ndarray, scheme: str = "linear", cap: float | None = None) -> np.ndarray:
    """Per-label positive weights from training prevalence pi (SPEC).

    ``linear``: (1 - pi) / pi; ``log``: log(1 + (1 - pi) / pi); then min(w, cap) if a
    cap is given. prevalence: [C] in [0, 1]. Returns [C] float64.
    """
    pi = np.asarray(prevalence, dtype=np.float64)
    if scheme not in WEIGHTINGS:
        raise CxrError(f"positive_weights: scheme={scheme!r} — choose one of {', '.join(WEIGHTINGS)}")
    if not ((pi >= 0) & (pi <= 1)).all():
        raise CxrError(f"positive_weights: prevalence outside [0, 1]: {pi} — pass positive fractions, not counts")
    if cap is None and (pi == 0).any():
        raise CxrError(
            f"positive_weights: labels {np.flatnonzero(pi == 0).tolist()} have no training positives "
            f"(infinite weight) — set loss.cap (e.g. 20) or use another loss"
        )
    with np.errstate(divide="ignore"):
        odds = (1.0 - pi) / pi
    w = odds if scheme == "linear" else np.log1p(odds)
    return w if cap is None else np.minimum(w, cap)


def positive_ratio(targets: torch.Tensor, batch_stats: str = "rank") -> torch.Tensor:
    """Fraction of positives per label in the batch, r_c: [B, C] -> [C] float32 (or float64).

    ``rank``: this process's batch. ``global``: positives and row counts summed over
    all ranks with torch.distributed (when initialised; else the same as ``rank``),
    i.e. the r of the concatenated global batch, also for unequal per-rank sizes.
    Unknown (NaN) targets are left out: r_c = positives / images that know label c (0.5,
    a neutral weight that no term uses, when none does). A statistic of the targets:
    computed without gradient.
    """
    if batch_stats not in BATCH_STATS:
        raise CxrError(f"loss.batch_stats={batch_stats!r} — choose one of {', '.join(BATCH_STATS)}")
    with torch.no_grad():
        y = targets.detach().to(torch.promote_types(targets.dtype, torch.float32))
        known = ~torch.isnan(y)
        stats = torch.cat([torch.where(known, y, torch.zeros_like(y)).sum(dim=0), known.sum(dim=0).to(y.dtype)])
        if batch_stats == "global" and torch.distributed.is_available() and torch.distributed.is_initialized():
            # One small collective per step; a sync point shared with DDP's own all-reduce.
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
        positives, counts = stats.chunk(2)
        return torch.where(counts > 0, positives / counts.clamp(min=1), torch.full_like(positives, 0.5))


def dynamic_weighted_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    smoothing: float = 0.1,
    eps: float = 1e-7,
    batch_stats: str = "rank",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The 2025 analysis' DynamicWeightedBCE_wgt_smooth, in the stable log-sigmoid form.

    r_c = batch mean of y; r~ = r (1 - s) + s / 2; w+ = 1 / (r~ + eps);
    w- = 1 / (1 - r~ + eps); loss = -mean[y w+ log p + (1-y) w- log(1-p)] over [B, C].
    batch_stats: ``rank`` (default: the statistic of the batch this process sees —
    with the reference's per-device batch it is exactly the reference loss, and it
    needs no communication) or ``global`` (all-reduced: the statistic of the whole
    global batch, steadier for rare labels when per-rank batches are small; under
    DDP with equal per-rank batches the averaged gradient then equals that of one
    process on the concatenated batch). r uses the UNsmoothed targets: it is the
    observed label frequency, already smoothed towards 0.5 by s; label smoothing
    only changes the targets inside the log terms.
    """
    r = positive_ratio(targets, batch_stats)
    z, y, known = _prepare(logits, targets)
    r = r.to(z.dtype)
    r_smooth = r * (1.0 - smoothing) + 0.5 * smoothing
    w_pos = 1.0 / (r_smooth + eps)
    w_neg = 1.0 / (1.0 - r_smooth + eps)
    y = smooth_labels(y, label_smoothing)
    return _mean(-(y * w_pos * F.logsigmoid(z) + (1.0 - y) * w_neg * F.logsigmoid(-z)), known)


def focal(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017), mean over [B, C] of
    -[a y (1-p)^gamma log p + (1-a) (1-y) p^gamma log(1-p)] with a = alpha, or
    both weights 1 when alpha is None.

    Each term carries its own modulating factor, which keeps the loss defined for
    smoothed (soft) targets; for 0/1 targets it is the usual FL(p_t). The factors
    (1-p)^gamma = exp(gamma logsigmoid(-z)) are taken in log space for stability.
    """
    z, y, known = _prepare(logits, targets)
    y = smooth_labels(y, label_smoothing)
    log_p, log_not_p = F.logsigmoid(z), F.logsigmoid(-z)
    pos = y * torch.exp(gamma * log_not_p) * log_p
    neg = (1.0 - y) * torch.exp(gamma * log_p) * log_not_p
    if alpha is not None:
        pos, neg = alpha * pos, (1.0 - alpha) * neg
    return _mean(-(pos + neg), known)


@dataclass
class LossConfig:
    """Which loss to train with and its options (``loss.<field>=value`` on the command line)."""

    name: str = "bce"
    """One of bce | weighted_bce | dynamic_weighted_bce | focal | ssim_recon (the OOD autoencoder's
    objective: its output is already the per-image 1 − SSIM, the loss is their mean; see cxr/tools/ood.py)."""
    weighting: str = "linear"
    """weighted_bce: positive weight from train prevalence pi, linear (1-pi)/pi or log log(1+(1-pi)/pi)."""
    cap: float | None = None
    """weighted_bce: upper bound of the positive weights (e.g. 20); None for no cap."""
    smoothing: float = 0.1
    """dynamic_weighted_bce: s in [0, 1], pulls the batch positive ratio towards 0.5."""
    eps: float = 1e-7
    """dynamic_weighted_bce: epsilon in the weights 1/(r~+eps), 1/(1-r~+eps)."""
    batch_stats: str = "rank"
    """dynamic_weighted_bce: positive ratio of this rank's batch (rank, default: the reference's
    per-device statistic, no communication) or of the global batch, all-reduced (global)."""
    gamma: float = 2.0
    """focal: focusing exponent gamma >= 0 (0 gives BCE)."""
    alpha: float | None = None
    """focal: weight of the positive term in [0, 1] (negatives get 1-alpha); None weighs both 1."""
    label_smoothing: float = 0.0
    """Every loss: targets become y (1-a) + a/2 with a in [0, 1)."""

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, valid: str) -> None:
            if not ok:
                raise CxrError(f"loss.{field}={getattr(self, field)!r}: invalid — valid: {valid}")

        check(self.name in LOSS_NAMES, "name", " | ".join(LOSS_NAMES))
        check(self.weighting in WEIGHTINGS, "weighting", " | ".join(WEIGHTINGS))
        check(self.cap is None or self.cap > 0, "cap", "None or a number > 0, e.g. 20")
        check(0.0 <= self.smoothing <= 1.0, "smoothing", "a number in [0, 1], e.g. 0.1")
        check(self.eps > 0, "eps", "a number > 0, e.g. 1e-7")
        check(self.batch_stats in BATCH_STATS, "batch_stats", " | ".join(BATCH_STATS))
        check(self.gamma >= 0, "gamma", "a number >= 0, e.g. 2")
        check(self.alpha is None or 0.0 <= self.alpha <= 1.0, "alpha", "None or a number in [0, 1], e.g. 0.25")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "a number in [0, 1), e.g. 0.05")


def build_loss(
    cfg: LossConfig, train_prevalence: np.ndarray | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of ``cfg`` as ``loss(logits, targets) -> scalar``.

    train_prevalence: [C] positive fraction per label in the training split
    (required by weighted_bce; the shards manifest records it).
    """
    ls = cfg.label_smoothing
    if cfg.name == "bce":
        return lambda z, y: bce(z, y, label_smoothing=ls)
    if cfg.name == "weighted_bce":
        if train_prevalence is None:
            raise CxrError(
                "loss.name=weighted_bce needs the training prevalence — pass train_prevalence "
                "(per-label positive fraction of the train split, from the shards manifest)"
            )
        w = torch.as_tensor(positive_weights(train_prevalence, cfg.weighting, cfg.cap))
        on_device: dict = {}  # one host-to-device copy per (device, dtype), not one per step

        def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            key = (z.device, torch.promote_types(z.dtype, torch.float32))
            if key not in on_device:
                on_device[key] = w.to(device=key[0], dtype=key[1])
            return weighted_bce(z, y, on_device[key], label_smoothing=ls)

        return loss
    if cfg.name == "ssim_recon":
        return lambda score, y: score.mean()
    if cfg.name == "dynamic_weighted_bce":
        return lambda z, y: dynamic_weighted_bce(
            z, y, smoothing=cfg.smoothing, eps=cfg.eps, batch_stats=cfg.batch_stats, label_smoothing=ls
        )
    return lambda z, y: focal(z, y, gamma=cfg.gamma, alpha=cfg.alpha, label_smoothing=ls)
