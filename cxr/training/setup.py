"""What a training builds before its first step (cxr/train.py): the run's label names and
train prevalence (from the shards manifest), the optimizer and LR schedule, the number of
steps per epoch, the val-split check, and loaders opened off the global RNG streams."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from accelerate.utils import gather_object

from cxr.config import Config
from cxr.data import load_shards_manifest
from cxr.data.shard_index import CorruptSample, SampleReader, SplitIndex, first_corrupt
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS, UNKNOWN
from shards.manifest import load_manifest

log = logging.getLogger("cxr.train")


# ----------------------------------------------------------------------------- labels
@functools.lru_cache(maxsize=8)
def _label_names(shards: str, resolution: int, num_labels: int) -> tuple[str, ...]:
    from shards import remote
    from shards.manifest import manifest_path

    if not remote.is_file(manifest_path(shards)):  # in-memory loaders of the tests
        return tuple(LABELS) if num_labels == len(LABELS) else tuple(f"label_{i}" for i in range(num_labels))
    folder, manifest = load_shards_manifest(shards, resolution)
    names = tuple(manifest.get("labels") or LABELS)
    if len(names) != num_labels:
        raise CxrError(
            f"{folder}/manifest.json: the shards have {len(names)} label(s) ({', '.join(names[:5])}) "
            f"but model.num_labels={num_labels} — set model.num_labels={len(names)}"
        )
    return names


def label_names(cfg: Config) -> list[str]:
    """The run's label names: the shards manifest's (the 14 NIH ones or a generic table's), which
    must number model.num_labels; without a manifest, the NIH names or label_0, label_1, ..."""
    return list(_label_names(str(cfg.data.shards), cfg.data.resolution, cfg.model.num_labels))


def train_prevalence(cfg: Config) -> np.ndarray | None:
    """[num_labels] train-split prevalence from the shards manifest (only weighted_bce needs it)."""
    if cfg.loss.name != "weighted_bce":
        return None
    folder, manifest = load_shards_manifest(cfg.data.shards, cfg.data.resolution)
    prevalence = manifest.get("splits", {}).get("train", {}).get("prevalence", {})
    names = label_names(cfg)
    missing = [name for name in names if name not in prevalence]
    if missing:
        raise CxrError(f"{folder}/manifest.json: splits.train.prevalence lacks {missing[:3]} — re-pack the shards")
    unknown = [name for name in names if prevalence[name] is None]
    if unknown:
        raise CxrError(
            f"{folder}/manifest.json: no train image knows label(s) {unknown[:3]} (all unknown), so "
            "weighted_bce has no prevalence for them — use loss.name=bce or dynamic_weighted_bce, or pack "
            "train images that have those labels"
        )
    return np.array([prevalence[name] for name in names], dtype=np.float64)


# ----------------------------------------------------------------------------- optimizer and schedule
def build_optimizer(cfg: Config, model: torch.nn.Module, l2_weights: list) -> torch.optim.Optimizer:
    """Adam/AdamW; weights with the model's own L2 penalty get no weight decay on top."""
    l2_ids = {id(p) for p in l2_weights}
    groups = [
        {
            "params": [p for p in model.parameters() if p.requires_grad and id(p) not in l2_ids],
            "weight_decay": cfg.optim.weight_decay,
        }
    ]
    if l2_weights:
        groups.append({"params": list(l2_weights), "weight_decay": 0.0})
    cls = torch.optim.Adam if cfg.optim.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler or None, stepped per optimizer step?) — plateau steps per epoch on the monitor."""
    sc = cfg.schedule
    if sc.name == "plateau":
        mode = "min" if sc.monitor == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=mode,
            factor=sc.factor,
            patience=sc.patience,
            threshold=sc.min_delta,
            threshold_mode="abs",
            min_lr=sc.min_lr,
        ), False
    if sc.name == "constant":
        return None, False
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    warmup = int(round(sc.warmup_epochs * steps_per_epoch))
    floor = sc.min_lr / cfg.optim.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# ----------------------------------------------------------------------------- data
def train_steps_per_epoch(cfg: Config, loader_fn: Callable, rank: int, world: int) -> int:
    """Optimizer steps per epoch (every epoch has the same number of train batches per rank)."""
    with torch.random.fork_rng(devices=[]):
        batches = len(loader_fn(cfg.data, "train", rank=rank, world_size=world, epoch=0, skip_batches=0))
    steps = batches // cfg.train.grad_accum_steps
    if batches % cfg.train.grad_accum_steps:
        log.warning(
            "train: %d batches per rank per epoch is not a multiple of train.grad_accum_steps=%d — "
            "the last %d micro-batches of every epoch are left out",
            batches,
            cfg.train.grad_accum_steps,
            batches % cfg.train.grad_accum_steps,
        )
    if steps < 1:
        raise CxrError(
            f"train: {batches} batches per rank per epoch < train.grad_accum_steps="
            f"{cfg.train.grad_accum_steps} — lower it or data.batch_size"
        )
    return steps


def check_val_split(cfg: Config, loader_fn: Callable, rank: int, world: int) -> None:
    """Build the val loader once before epoch 1: a missing, empty or corrupt split fails before
    any training (each rank reads its share of the val samples' bytes with the loaders' checks),
    and so does one where train.best_metric=val_mean_auroc is undefined (no label with both classes).

    The val bytes are read once: the class counts come from the manifest's per-split statistics
    (``splits.val.positives``, written by pack), or, for a manifest without them, from the same
    pass that checks the bytes (label_counts)."""
    bad, positives, known = None, None, None
    try:
        with torch.random.fork_rng(devices=[]):
            loader = loader_fn(cfg.data, "val", rank=rank, world_size=world, epoch=0, train=False)
        batches = len(loader)
        index = getattr(loader, "index", None)
        if isinstance(index, SplitIndex):  # shards (not in-memory data)
            need = cfg.train.best_metric == "val_mean_auroc"
            known = manifest_label_counts(index, "val") if need else None
            try:
                if need and known is None:
                    positives = label_counts(index, rank, world)  # checks and counts in one pass
                else:
                    found = first_corrupt(index, rank, world)
                    bad = None if found is None else str(found.as_error())
            except CorruptSample as corrupt:
                bad = str(corrupt.as_error())
    except CxrError as err:
        if "no shards for split 'val'" not in str(err):
            raise
        batches = 0
    counts, errors, shares = zip(*gather_object([(batches, bad, positives)]))
    if sum(counts) == 0:
        raise CxrError(
            f"{cfg.data.shards}: split 'val' has 0 samples — validation needs some: re-split "
            f"with a val fraction > 0 (python -m shards split --fractions 0.7,0.15,0.15) and re-pack"
        )
    if any(errors):
        raise CxrError(next(e for e in errors if e))
    if known is not None:
        check_auroc_defined(cfg, *known)
    elif all(share is not None for share in shares):
        check_auroc_defined(cfg, np.sum([s[0] for s in shares], axis=0), sum(s[1] for s in shares))
    if rank == 0:
        warn_small_or_skewed(cfg)


def manifest_label_counts(index: SplitIndex, split: str) -> tuple[np.ndarray, np.ndarray | int] | None:
    """([num_labels] positives, [num_labels] known samples or one count for all) of a whole split from
    its manifest's statistics (pack's shards.records.split_summary), without reading a sample; None
    when the manifest lacks them or they do not describe the indexed samples (then label_counts
    reads them). Manifests from before masked labels have no ``known``: every label is known."""
    try:
        manifest = load_manifest(index.shards_dir)
    except CxrError:
        return None
    stats = manifest.get("splits", {}).get(split, {})
    names, positives = manifest.get("labels") or [], stats.get("positives") or {}
    if len(names) != index.num_labels or stats.get("samples") != len(index) or any(n not in positives for n in names):
        return None
    known = stats.get("known")
    if isinstance(known, dict) and all(n in known for n in names):
        return np.array([positives[n] for n in names], np.int64), np.array([known[n] for n in names], np.int64)
    return np.array([positives[n] for n in names], np.int64), len(index)


def label_counts(index: SplitIndex, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """([num_labels] positives, [num_labels] known samples) of this rank's share of a split, from the
    .labels bytes read with the loaders' integrity checks (CorruptSample on the first bad sample);
    an unknown entry (byte 255) counts in neither."""
    reader = SampleReader(index)
    total, known = np.zeros(index.num_labels, np.int64), np.zeros(index.num_labels, np.int64)
    try:
        for i in range(rank, len(index), world):
            _, labels, _ = reader.read(i)
            total += labels == 1
            known += labels != UNKNOWN
    finally:
        reader.close()
    return total, known


def check_auroc_defined(cfg: Config, positives: np.ndarray, known: np.ndarray | int) -> None:
    """val_mean_auroc is the mean AUROC over the labels with both classes in the val split: with no
    such label it is NaN every epoch, no epoch is ever "best", and the run would end with no best
    checkpoint. Refused before epoch 1 when it is train.best_metric. ``known``: per label the
    samples that know it (or one count for all)."""
    samples = int(np.max(known)) if np.size(known) else 0
    if np.any((positives > 0) & (positives < known)):
        return
    raise CxrError(
        f"{cfg.data.shards}: split 'val' ({samples} samples) has no label with both positive and "
        f"negative samples, so val_mean_auroc is undefined and no epoch could be best "
        f"(train.best_metric=val_mean_auroc) — re-split with a larger val fraction and re-pack, or set "
        f"train.best_metric=val_loss"
    )


def warn_small_or_skewed(cfg: Config) -> None:
    """Log the data warnings of the shards manifest (shards.manifest.split_warnings): a val split
    too small for AUROC or lacking a class of some labels, train labels without positives."""
    from shards.manifest import MANIFEST_NAME, manifest_warnings

    try:
        folder, manifest = load_shards_manifest(cfg.data.shards, cfg.data.resolution)
    except CxrError:
        return  # in-memory data (tests) or a folder the loaders already accepted otherwise
    for warning in manifest_warnings(manifest, folder / MANIFEST_NAME):
        log.warning("warning: %s", warning)


def open_loader(loader_fn: Callable, cfg: Config, split: str, rank: int, world: int, **kwargs):
    """(loader, iterator) built without touching the global RNG streams: a torch DataLoader draws
    its worker seed from them, which would make a resumed run's dropout masks differ."""
    with torch.random.fork_rng(devices=[]):
        loader = loader_fn(cfg.data, split, rank=rank, world_size=world, **kwargs)
        return loader, iter(loader)
