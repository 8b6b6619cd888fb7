"""Which samples each rank reads, in which batches, for one epoch.

Both back ends consume the same plan, so their batches hold the same keys:

- eval: rank r reads the contiguous slice [r·N/w, (r+1)·N/w) of the split in packing
  order (sequential reads), batched with a partial last batch. Every sample is read
  exactly once across ranks; there is no padding to remove.
- train: a permutation of all N samples drawn from numpy's PCG64 seeded with
  (seed, epoch); the first n_b·w·B entries form n_b = ⌊N / (w·B)⌋ global batches and
  rank r takes the r-th B-slice of each. Every rank yields n_b batches (DDP needs
  equal counts), the N − n_b·w·B samples dropped change every epoch, and
  `skip_batches=k` starts at global batch k — exactly batches k.. of the unskipped plan.

What a resume reproduces exactly: the keys and their order, labels and meta, and the
augmentation parameters (drawn per (seed, epoch, key), cxr/data/augmentation.py), so
with the same back end and device the images are bit-identical too (tested). The plan
depends on world_size: resuming with a different number of ranks keeps the epoch's
permutation but regroups it into batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxrbase.errors import CxrError


@dataclass(frozen=True)
class EpochPlan:
    """Sample indices per batch for one rank and epoch; `batches[i]` is int64 [≤B]."""

    batches: list[np.ndarray]
    batches_per_epoch: int  # before skipping

    @property
    def num_samples(self) -> int:
        return int(sum(len(b) for b in self.batches))


def epoch_plan(
    n: int, batch_size: int, rank: int, world_size: int, epoch: int, seed: int, train: bool, skip_batches: int = 0
) -> EpochPlan:
    """Plan one epoch of `n` samples for `rank` of `world_size` (see module docstring)."""
    if not 0 <= rank < world_size:
        raise CxrError(f"rank={rank}, world_size={world_size}: need 0 ≤ rank < world_size — check the launcher")
    if train:
        per_global = world_size * batch_size
        n_batches = n // per_global
        if n_batches == 0:
            raise CxrError(
                f"train split has {n} samples < world_size × batch_size = {per_global}: "
                "no full batch per rank — lower batch_size or use more data"
            )
        perm = np.random.default_rng([seed, epoch]).permutation(n)[: n_batches * per_global]
        rows = perm.reshape(n_batches, world_size, batch_size)[:, rank, :]
        batches = list(rows)
    else:
        start, stop = rank * n // world_size, (rank + 1) * n // world_size
        ids = np.arange(start, stop, dtype=np.int64)
        n_batches = math.ceil(len(ids) / batch_size)
        batches = [ids[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    if not 0 <= skip_batches <= n_batches:
        raise CxrError(
            f"skip_batches={skip_batches}: must be in [0, {n_batches}] (batches this epoch) — "
            "check the resumed loader position"
        )
    return EpochPlan(batches[skip_batches:], n_batches)
