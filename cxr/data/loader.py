"""`build_loader`: one contract over the two back ends (DALI, torch/PIL).

A batch is a dict:
  image  uint8 [B, 1, R, R]    pixels 0…255 (warped in augmented training); the model's input is
                               cxr.data.batch.to_device(batch, device): float32 on the device,
                               normalized ((x/255 − mean) / std; intensity-augmented in training).
                               DALI "mixed" (data.device=gpu) hands over that float32 on the GPU already.
  norm   (mean, std)           data.mean / data.std, which to_device applies
  brightness, contrast
         float32 [B]           the intensity step's per-sample parameters (augmented training only)
  labels float32 [B, L]        1/0, NaN where unknown (`.labels` byte 255, masked: losses and
                               metrics skip it); the manifest's label order (NIH: cxrbase.labels.LABELS)
  meta   float32 [B, 5]        z-scored age (manifest train stats; unknown age → 0),
                               sex_M, sex_F, view_PA, view_AP
  key    list[str]             NIH image ids
B is the batch size except for the last eval batch, and minus any corrupt samples
skipped in training (the number of batches never changes, so ranks stay in step; a
batch whose every sample is corrupt raises CxrError rather than desynchronise them).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import numpy as np

from cxr.data.config import DataConfig
from cxr.data.plan import epoch_plan
from cxr.data.shard_index import (
    CorruptSample,
    IndexMismatch,
    SampleReader,
    SplitIndex,
    load_shards_manifest,
    meta_stats,
)
from cxrbase.labels import UNKNOWN

log = logging.getLogger("cxr.data")


def build_loader(
    cfg: DataConfig,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    skip_batches: int = 0,
    train: bool | None = None,
) -> Loader:
    """Loader of `split` for one epoch on `rank` of `world_size` (train defaults to split == "train").

    `skip_batches=k` yields exactly batches k.. of the same epoch (mid-epoch resume).
    """
    return Loader(cfg, split, rank, world_size, epoch, skip_batches, split == "train" if train is None else train)


def unmask(labels) -> np.ndarray:
    """``.labels`` bytes [B, L] (uint8, 255 = unknown) → float32 with NaN for unknown; both back
    ends' batches pass through here, so the mask reaches every loss and metric the same way."""
    raw = np.asarray(labels)
    out = raw.astype(np.float32)
    out[raw == UNKNOWN] = np.nan
    return out


class Loader:
    """Iterable of batch dicts for one epoch; `len()` and `num_samples` are known before iterating."""

    def __init__(
        self, cfg: DataConfig, split: str, rank: int, world_size: int, epoch: int, skip_batches: int, train: bool
    ):
        self.cfg, self.split, self.train, self.epoch = cfg, split, train, epoch
        shards, self.fetch_seconds = cfg.shards, 0.0  # fetch_seconds: node-local cache (run log, throughput.csv)
        if cfg.backend == "dali":
            from cxr.data.dali_loader import cached_shards

            shards, self.fetch_seconds = cached_shards(cfg, split)
        self.shards_dir, manifest = load_shards_manifest(shards, cfg.resolution)
        self.index = SplitIndex.load(self.shards_dir, manifest, split)
        self.age_mean, self.age_std = meta_stats(self.shards_dir, manifest)
        batch = cfg.batch_size if train else cfg.eval_batch
        self.plan = epoch_plan(len(self.index), batch, rank, world_size, epoch, cfg.resolved_seed, train, skip_batches)
        self.batches_per_epoch = self.plan.batches_per_epoch
        self._skipped: list[str] = []
        self._samples = 0
        augment = train and cfg.augment
        if cfg.backend == "dali":
            from cxr.data.dali_loader import DaliBatches

            native, known = _native_size(self.index, manifest)
            self._backend = DaliBatches(cfg, self.index, cfg.resolution, epoch, augment, native, known, rank)
        else:
            from cxr.data.wds_loader import WdsBatches

            self._backend = WdsBatches(cfg, self.index, cfg.resolution, epoch, augment)

    def __len__(self) -> int:
        """Batches this rank yields this epoch (after skip_batches); equal on all ranks in training."""
        return len(self.plan.batches)

    @property
    def num_samples(self) -> int:
        """Samples this rank is planned to yield this epoch (corrupt ones found on the way excepted)."""
        return self.plan.num_samples

    def __iter__(self) -> Iterator[dict]:
        import torch

        self._skipped, self._samples = [], 0
        start = time.perf_counter()
        # labels and meta arrive with each image, from the read that checked all three
        norm = (self.cfg.mean, self.cfg.std)
        for images, ids, labels, meta, intensity in self._backend.iterate(self.plan.batches, self._on_corrupt):
            labels = unmask(labels)
            meta = self._meta(np.asarray(meta))
            self._samples += len(ids)
            batch = {
                "image": images,
                "labels": torch.from_numpy(labels),
                "meta": torch.from_numpy(meta),
                "key": [self.index.keys[int(i)] for i in ids],
                "norm": norm,
            }
            if intensity is not None:
                batch["brightness"], batch["contrast"] = intensity
            yield batch
        self._log_summary(time.perf_counter() - start)

    def report(self) -> dict:
        """{"samples": yielded, "skipped": corrupt samples skipped, "skipped_keys": [...]} of the last epoch."""
        return {"samples": self._samples, "skipped": len(self._skipped), "skipped_keys": list(self._skipped)}

    def _on_corrupt(self, corrupt: CorruptSample) -> None:
        if not self.train or self.cfg.strict or isinstance(corrupt, IndexMismatch):  # a wrong index is no skip
            raise corrupt.as_error()
        log.warning("skipping corrupt sample: %s", corrupt)
        self._skipped.append(corrupt.key)

    def _meta(self, raw: np.ndarray) -> np.ndarray:
        meta = raw.astype(np.float32, copy=True)
        age = (meta[:, 0] - self.age_mean) / self.age_std
        meta[:, 0] = np.where(np.isfinite(age), age, 0.0)
        return meta

    def _log_summary(self, seconds: float) -> None:
        rate = self._samples / seconds if seconds > 0 else 0.0
        msg = (
            f"{self.split} epoch {self.epoch}: {self._samples} samples, {len(self._skipped)} corrupt skipped, "
            f"{seconds:.1f} s, {rate:.0f} images/s ({self.cfg.backend}, decode on "
            f"{getattr(self._backend, 'decoder', '?')})"
        )
        (log.warning if self._skipped else log.info)(
            msg + (f"; skipped: {self._skipped[:10]}" if self._skipped else "")
        )


def _native_size(index: SplitIndex, manifest: dict) -> tuple[tuple[int, int] | None, bool]:
    """(pixel size of the shards' images, whether the manifest vouches it holds for all of them).

    From the manifest (derived resolution, or a single entry in image_sizes), else the
    first sample's header (then every sample's header is checked as it is read).
    """
    if manifest.get("resolution"):
        return (int(manifest["resolution"]), int(manifest["resolution"])), True
    sizes = manifest.get("image_sizes") or {}
    if len(sizes) == 1:
        width, _, height = next(iter(sizes)).partition("x")
        return (int(width), int(height)), True
    if len(sizes) > 1:
        return None, True  # mixed sizes: resize every image
    from PIL import Image

    reader = SampleReader(index)
    try:
        return Image.open(io.BytesIO(reader.read(0)[0])).size, False
    except (CorruptSample, OSError):
        return None, False  # resize everything; the corrupt sample is reported when its turn comes
    finally:
        reader.close()
