"""The DALI back end: encoded bytes → decode (CPU, or GPU with device "mixed") → resize → augment → normalize.

Why `fn.external_source` and not `fn.readers.webdataset`: the reader shards by sample
count per rank and shuffles with a buffer, so it cannot give the training contract —
a global permutation reproducible from (seed, epoch), equal batch counts on all ranks
with a different remainder dropped each epoch, and an exact `skip_batches` resume. In
evaluation its padded last batch must be stripped by key, and a corrupt image fails a
whole batch without naming the sample. Instead the Python side follows the shared
`EpochPlan` (cxr/data/plan.py): it reads each sample's tar members by the `.idx`
offsets (a few preads per image; the same offsets DALI's reader would use) and hands
DALI the encoded bytes plus the per-sample augmentation parameters. PNG checksums
are verified by libpng inside DALI's threads rather than in a Python pass that would
compete with the decoder threads for the same cores; when DALI rejects a batch, its samples are
checked and decoded one by one with PIL to name the culprit, which is skipped (train)
or reported (eval), and the pipeline restarts at that batch. Decoding, resizing and warping — the costly part — run in DALI's thread
pool (or on the GPU), asynchronously to training; batches are prefetched
`prefetch_queue_depth` deep. Evaluation therefore has no padding at all: each rank
reads its own contiguous slice, and the last batch is simply shorter.

`device="gpu"` is the only switch for GPU decoding: decoder device "mixed" and
device_id = LOCAL_RANK (or the rank). GPU decode helps only JPEG / JPEG 2000 shards;
PNG decodes on the CPU even in "mixed" mode.
"""
from __future__ import annotations

import io
import os
from collections import deque
from typing import Callable, Iterator

import numpy as np

from cxr.data.augmentation import draw_params
from cxr.data.config import DataConfig
from shards.errors import CxrError
from cxr.data.shard_index import CorruptSample, SampleReader, SplitIndex

OnCorrupt = Callable[[CorruptSample], None]  # records a skip, or raises CxrError


class DaliBatches:
    """Runs the plan's batches through a DALI pipeline; yields (images [b,1,R,R], sample ids)."""

    def __init__(self, cfg: DataConfig, index: SplitIndex, resolution: int, epoch: int, augment: bool,
                 native_size: tuple[int, int] | None, size_known: bool, rank: int):
        self.cfg, self.index, self.res, self.epoch, self.augment = cfg, index, resolution, epoch, augment
        self.resize = native_size != (resolution, resolution)
        self.check_size = not self.resize and not size_known  # sized from one header: check the others
        self.device_id = None if cfg.device == "cpu" else int(os.environ.get("LOCAL_RANK", rank))

    def iterate(self, batches: list[np.ndarray], on_corrupt: OnCorrupt) -> Iterator[tuple[object, np.ndarray]]:
        """Yield every planned batch minus corrupt samples; a decoder failure restarts at that batch."""
        bad: set[int] = set()
        pos = 0
        while pos < len(batches):
            feed = _Feed(self, batches[pos:], bad, on_corrupt)
            try:
                for images, ids in feed.run():
                    yield images, ids
                    pos += 1
                return
            except RuntimeError as err:  # DALI decode failure: the integrity check could not see it
                ids = feed.pending[0] if feed.pending else np.empty(0, np.int64)
                found = _find_undecodable(feed.reader, ids, self.index.codec)
                if found is None:
                    raise
                on_corrupt(found[1])  # raises in eval / strict
                bad.add(found[0])
            finally:
                feed.reader.close()


class _Feed:
    """One pipeline run over a list of batches: the external source and the output side."""

    def __init__(self, owner: DaliBatches, batches: list[np.ndarray], bad: set[int], on_corrupt: OnCorrupt):
        self.o, self.batches, self.bad, self.on_corrupt = owner, iter(batches), bad, on_corrupt
        self.reader = SampleReader(owner.index)
        self.pending: deque[np.ndarray] = deque()  # ids of batches fed to DALI, not yet output

    def source(self):
        """External source callback: next batch's encoded images (+ augmentation params)."""
        ids = next(self.batches)  # StopIteration ends the epoch
        keep, data = [], []
        for i in ids:
            if int(i) in self.bad:
                continue
            try:
                # libpng checks PNG CRCs inside DALI's threads; a failure is located by _find_undecodable
                image, _, _ = self.reader.read(int(i), check_image=False)
                if self.o.check_size:
                    _check_size(image, self.o.res, self.reader.index, int(i))
            except CorruptSample as corrupt:
                self.bad.add(int(i))  # a restart must not report it twice
                self.on_corrupt(corrupt)
                continue
            keep.append(int(i))
            data.append(np.frombuffer(image, np.uint8))
        if not data:
            index = self.o.index
            raise all_corrupt_error([index.shard_paths[index.shard[i]] for i in ids], [index.keys[i] for i in ids])
        ids = np.asarray(keep, np.int64)
        self.pending.append(ids)
        if not self.o.augment:
            return (data,)
        params = draw_params([self.o.index.keys[i] for i in ids], self.o.cfg, self.o.epoch, self.o.res)
        return data, list(params.matrix), list(params.brightness[:, None]), list(params.contrast[:, None])

    def run(self) -> Iterator[tuple[object, np.ndarray]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = _pipeline(self.o, self.source)
        it = DALIGenericIterator(pipe, ["image"], auto_reset=False, prepare_first_batch=False)
        for out in it:
            yield out[0]["image"], self.pending.popleft()


def _pipeline(o: DaliBatches, source):
    from nvidia.dali import fn, math as dmath, pipeline_def, types

    cfg, res, gpu = o.cfg, o.res, o.cfg.device == "gpu"

    @pipeline_def(batch_size=max(cfg.batch_size, cfg.eval_batch), num_threads=max(cfg.num_threads, 1),
                  device_id=o.device_id, seed=cfg.resolved_seed, prefetch_queue_depth=2)
    def pipe():
        n_out = 4 if o.augment else 1  # augmentation parameters only when augmenting
        inputs = fn.external_source(source=source, num_outputs=n_out, batch=True,
                                    dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT][:n_out])
        encoded = inputs[0]
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.GRAY)
        if o.resize:
            image = fn.resize(image, size=[res, res], interp_type=types.INTERP_LINEAR, antialias=True)
        if not o.augment:
            return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[cfg.mean * 255], std=[cfg.std * 255])
        matrix, bright, contrast = inputs[1:]
        image = fn.warp_affine(image, matrix=matrix, size=[res, res], fill_value=0,
                               interp_type=types.INTERP_LINEAR, inverse_map=True)
        x = fn.cast(image, dtype=types.FLOAT) / 255.0
        if gpu:
            bright, contrast = bright.gpu(), contrast.gpu()
        y = dmath.clamp(bright * (0.5 + contrast * (x - 0.5)), 0.0, 1.0)
        return fn.transpose((y - cfg.mean) / cfg.std, perm=[2, 0, 1])

    p = pipe()
    try:
        p.build()
    except RuntimeError as err:
        if gpu:
            raise CxrError(f"data.device=gpu: DALI could not build a GPU pipeline on device {o.device_id} "
                           f"({str(err).splitlines()[0]}) — run on a CUDA machine or set data.device=cpu") from err
        raise
    return p


def all_corrupt_error(shards: list, keys: list[str]) -> CxrError:
    """Dropping a whole batch would desynchronise the ranks' batch counts (DDP hangs): stop instead."""
    return CxrError(f"{', '.join(sorted(set(map(str, shards))))}: every sample of a batch is corrupt ({keys}) — "
                    "re-pack these shards (python -m shards verify lists all bad samples)")


def _check_size(image: bytes, res: int, index: SplitIndex, i: int) -> None:
    from PIL import Image

    size = Image.open(io.BytesIO(image)).size  # header only
    if size != (res, res):
        raise CorruptSample(index.shard_paths[index.shard[i]], index.keys[i],
                            f"is {size[0]}×{size[1]} but the shards' first sample is {res}×{res} "
                            "(mixed sizes: pack derived shards with --resize)")


def _find_undecodable(reader: SampleReader, ids: np.ndarray, codec: str) -> tuple[int, CorruptSample] | None:
    """Check and decode each sample of a failed batch (checksums, then PIL) to name the one DALI rejected."""
    from PIL import Image

    for i in ids:
        try:
            image, _, _ = reader.read(int(i))
        except CorruptSample as corrupt:
            return int(i), corrupt
        try:
            Image.open(io.BytesIO(image)).load()
        except Exception as err:  # any decoder failure marks the sample
            return int(i), CorruptSample(reader.index.shard_paths[reader.index.shard[i]], reader.index.keys[i],
                                         f"{codec} does not decode ({err})")
    return None
