"""The torch back end (`backend: wds`): the same WebDataset tar shards, decoded in DataLoader workers.

Images decode with pack's decoder (`shards.image_codec.decode_grey`): png with the libpng
inside imagecodecs (~1.2x PIL per core), lossless JPEG (`ljpeg`) with its libjpeg-turbo
(`decode_ljpeg`, independent of the libjpeg Pillow was built with), jpeg / j2k with PIL.
Decoding is always on the CPU here.

It reads members by the `.idx` offsets as the DALI back end does, rather than
streaming tars through `webdataset.WebDataset` with `split_by_node` /
`split_by_worker` and a shuffle buffer: those split whole shard files between ranks
and workers (a run with fewer shards than ranks × workers leaves some idle or
empty, and per-rank batch counts differ), shuffle only within a buffer, and can
resume mid-epoch only by replaying the stream. Following the shared `EpochPlan`
instead gives both back ends identical batches: the same keys in the same order.
The pixel path and the augmentation parameters are those of cxr/data/augmentation.py.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Iterator
from functools import partial

import numpy as np

from cxr.data.augmentation import draw_params, warp_affine_torch
from cxr.data.config import DataConfig
from cxr.data.shard_index import CorruptSample, OnCorrupt, SampleReader, SplitIndex, all_corrupt_error, decode_resize
from cxr.data.workers import STOP_SIGNALS, stop_signals_blocked

log = logging.getLogger("cxr.data")


class WdsBatches:
    """Runs the plan's batches through a torch DataLoader; yields (images uint8 [b,1,R,R], sample ids, labels,
    meta, intensity: (brightness, contrast) float32 [b] when augmenting, else None).

    Labels and meta come from the same checked read as each image (DecodedSamples)."""

    def __init__(self, cfg: DataConfig, index: SplitIndex, resolution: int, epoch: int, augment: bool):
        self.dataset = DecodedSamples(cfg, index, resolution, epoch, augment)
        self.cfg = cfg
        self.decoder = f"cpu ({'imagecodecs' if index.codec in ('png', 'ljpeg') else 'PIL'}, DataLoader workers)"
        log.info("decode: %s shards on %s", index.codec, self.decoder)

    def iterate(self, batches: list[np.ndarray], on_corrupt: OnCorrupt) -> Iterator[tuple]:
        """Yield every planned batch minus corrupt samples (reported through on_corrupt)."""
        import torch

        workers = self.cfg.num_threads
        # The iterator draws its workers' base seed from this generator, not from torch's global one:
        # it is created at the first batch, outside train_setup.open_loader's fork_rng, and a draw from
        # the global stream there would shift a resumed run's dropout masks (augmentation is keyed by
        # sample and epoch, so the workers' seed itself changes nothing).
        generator = torch.Generator().manual_seed(self.cfg.resolved_seed * 1000 + self.dataset.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=[b.tolist() for b in batches],
            generator=generator,
            num_workers=workers,
            collate_fn=partial(_collate, augment=self.dataset.augment),
            pin_memory=self.cfg.pinned,
            worker_init_fn=_one_thread if workers else None,
            persistent_workers=False,
            multiprocessing_context=_worker_context() if workers else None,
        )
        batches_iter = iter(loader)
        _stop_at_exit(batches_iter)
        try:
            for images, ids, labels, meta, intensity, corrupt in batches_iter:
                for c in corrupt:
                    on_corrupt(c)  # raises in eval / strict
                if not len(ids):
                    raise all_corrupt_error([c.shard for c in corrupt], [c.key for c in corrupt])
                yield images, ids, labels, meta, intensity
        finally:
            # a traceback keeps this frame alive; stop the workers now, not at garbage collection,
            # or the next loader forks while their queue threads hold locks and can deadlock
            shutdown = getattr(batches_iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


class DecodedSamples:
    """Map-style dataset: sample id → (id, (uint8 [1,R,R] after the warp, brightness, contrast, labels, meta))
    or (id, the CorruptSample).

    Workers hand uint8 pixels to the collate step, which writes the uint8 batch once into
    shared memory; it stays uint8 through pinning and the copy to the device, where
    cxr.data.batch.to_device applies the intensity step and the normalisation.
    """

    def __init__(self, cfg: DataConfig, index: SplitIndex, resolution: int, epoch: int, augment: bool):
        self.cfg, self.index, self.res, self.epoch, self.augment = cfg, index, resolution, epoch, augment
        self.reader = SampleReader(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        try:
            image, labels, meta = self.reader.read(i)
            pixels = decode_resize(image, self.res, self.index, i)
        except CorruptSample as corrupt:
            return i, corrupt
        return i, (*self.warp(pixels, self.index.keys[i]), labels, meta)

    def warp(self, pixels: np.ndarray, key: str):
        """uint8 [R,R] → (uint8 [1,R,R] flipped/rotated/zoomed/shifted in training, brightness, contrast)."""
        import torch

        x = torch.from_numpy(pixels)[None]
        if not self.augment:
            return x, 1.0, 1.0
        p = draw_params([key], self.cfg, self.epoch, self.res)
        warped = warp_affine_torch(x.float(), p.matrix[0]).round_().clamp_(0, 255).to(torch.uint8)
        return warped, float(p.brightness[0]), float(p.contrast[0])


def _collate(items, augment: bool):
    """Stack a batch: (images uint8 [b,1,R,R], ids int64 [b], labels uint8 [b, L], meta float32 [b, 5],
    intensity: (brightness, contrast) float32 [b] when augmenting else None, corrupt samples).

    The pixels stay bytes: the float steps (intensity, normalisation) run on the training device
    (cxr.data.batch.to_device), so the batch pinned and copied there is 1 byte per pixel."""
    import torch

    good = [(i, x) for i, x in items if not isinstance(x, CorruptSample)]
    corrupt = [x for _, x in items if isinstance(x, CorruptSample)]
    if not good:
        return None, np.empty(0, np.int64), None, None, None, corrupt
    shape = (len(good), *good[0][1][0].shape)
    out = _batch_buffer(shape)
    for j, (_, (pixels, *_)) in enumerate(good):
        out[j].copy_(pixels)
    intensity = None
    if augment:
        bright = torch.tensor([x[1] for _, x in good], dtype=torch.float32)
        intensity = (bright, torch.tensor([x[2] for _, x in good], dtype=torch.float32))
    labels = np.stack([x[3] for _, x in good])
    meta = np.stack([x[4] for _, x in good])
    return out, np.asarray([i for i, _ in good], np.int64), labels, meta, intensity, corrupt


def _batch_buffer(shape: tuple[int, ...]):
    """uint8 tensor of `shape`; in a worker, allocated in shared memory as torch's default_collate does."""
    import torch

    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    ref = torch.empty(0, dtype=torch.uint8)
    storage = ref._typed_storage()._new_shared(int(np.prod(shape)), device=ref.device)
    return ref.new(storage).resize_(shape)


_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _stop_at_exit(batches_iter) -> None:
    """Stop this iterator's workers at interpreter exit if it is still open then.

    The workers ignore SIGTERM (the job's stop signal, see _one_thread), so multiprocessing's exit
    handler, which terminates and then joins every child, would wait for them forever; and torch's own
    clean-up does nothing once its exit flag is set. An iterator that outlives the training loop (a
    generator left suspended by a stop, freed only at exit) is shut down here instead, before both:
    atexit runs this handler, registered after torch was imported, first."""
    if not _OPEN_ITERATORS and not getattr(_stop_at_exit, "registered", False):
        atexit.register(_shutdown_open_iterators)
        _stop_at_exit.registered = True
    _OPEN_ITERATORS.add(batches_iter)


def _shutdown_open_iterators() -> None:
    for batches_iter in list(_OPEN_ITERATORS):
        shutdown = getattr(batches_iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _worker_context():
    """forkserver: forking a process that runs DALI / torch thread pools can deadlock the child.

    The server imports torch, PIL and this module once, so each epoch's workers start
    by a fork of it instead of re-importing torch.
    """
    import multiprocessing
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "PIL.PngImagePlugin", "imagecodecs", "cxr.data.wds_loader"]
    )  # no-op once started
    # the fork server and multiprocessing's resource tracker start with the job's stop signals
    # blocked, a mask they and the workers forked from the server inherit (stop_signals_blocked)
    with stop_signals_blocked():
        forkserver.ensure_running()
    return ctx


def _one_thread(_worker: int) -> None:
    import signal

    import torch

    torch.set_num_threads(1)  # workers are the parallelism; intra-op threads would oversubscribe
    # srun / scancel --signal / submitit signal every process of the job: a worker that died of
    # SIGUSR1 would crash the loader before the main process saves. The main process handles
    # the stop (cxr.runs.distributed.StopFlag) and ends the workers itself.
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
