"""The DALI back end: encoded bytes → decode (CPU, or GPU with device "mixed") → augment → normalize.

Resizing on the fly (masters at another resolution than asked) decodes and resizes in the
external source with `pack --resize`'s filter (shards.image_codec.resize_grey), so both
back ends and derived shards give the same pixels; derived `resN/` shards avoid that cost.

Why `fn.external_source` and not `fn.readers.webdataset`: the reader shards by sample
count per rank and shuffles with a buffer, so it cannot give the training contract —
a global permutation reproducible from (seed, epoch), equal batch counts on all ranks
with a different remainder dropped each epoch, and an exact `skip_batches` resume. In
evaluation its padded last batch must be stripped by key, and a corrupt image fails a
whole batch without naming the sample. Instead the Python side follows the shared
`EpochPlan` (cxr/data/plan.py): it reads each sample's tar members by the `.idx`
offsets (a few preads per image; the same offsets DALI's reader would use) and hands
DALI the encoded bytes plus the per-sample augmentation parameters. Each sample's
bytes are checked against the crc32 its .json recorded at pack time (format /2;
zlib.crc32 releases the GIL, ≈1 ns/byte) before DALI sees them, so damage a
decoder would not notice — a flipped byte in JPEG entropy data decodes to wrong
pixels — is caught as in the wds back end. For /1 shards (no checksums) PNG CRCs
are left to libpng inside DALI's threads; when DALI rejects a batch, its samples are
checked and decoded one by one with PIL to name the culprit, which is skipped (train)
or reported (eval), and the pipeline restarts at that batch. Decoding, resizing and warping — the costly part — run in DALI's thread
pool (or on the GPU), asynchronously to training; batches are prefetched
`prefetch_queue_depth` deep. Evaluation therefore has no padding at all: each rank
reads its own contiguous slice, and the last batch is simply shorter.

Each split's pipeline is built once per process and reused: the external source
calls whichever epoch's feed is current, and the iterator is reset when the next
epoch starts (a pipeline left mid-epoch — an early break, a decode failure — is
dropped and rebuilt, never reused with stale prefetched batches).

With `data.source_workers=N ≥ 1` the external source runs in DALI's parallel mode
(`fn.external_source(parallel=True, batch_info=True)`, N spawned worker processes):
`_ParallelSource`, a picklable callable holding this run's planned batches, reads and
checks batch k when DALI asks for BatchInfo.iteration k, drops corrupt samples and
returns the ids it kept as an extra output. The main process compares those ids with
the plan and re-reads each missing sample to report it through the same `on_corrupt`
(so skips, their messages and eval's CxrError are those of the serial source). Because
the callable and its batch list are pickled into the workers when the pipeline starts,
such a pipeline cannot be reset into the next epoch: it is built per run (epoch, eval
pass or restart) and its workers shut down after it. Workers are spawned, not forked (a
CUDA context must not be forked), so each re-imports the main script. On the 2-core
development machine the parallel source gained ≤ 1.2× in steady state and lost over a
whole epoch (bench/RESULTS.md, "DALI parallel external source"), hence default 0.

`device="gpu"` is the only switch for GPU decoding: decoder device "mixed" and
device_id = the LOCAL rank (LOCAL_RANK, SLURM_LOCALID, or torch's current device — never
the global rank, which exceeds the GPU count on every node but the first). GPU decode
helps only JPEG, lossless JPEG (`ljpeg`, nvJPEG since DALI 1.23) and JPEG 2000 shards;
PNG decodes on the CPU even in "mixed" mode. The chosen decode device is logged when the
loader is built. The lossless JPEG GPU path is untested in this repository (no GPU on its
test machines).
"""
from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict, deque
from typing import Callable, Iterator

import numpy as np

from cxr.data.augmentation import draw_params
from cxr.data.config import DataConfig
from cxrbase.errors import CxrError
from cxr.data.shard_index import CorruptSample, SampleReader, SplitIndex

OnCorrupt = Callable[[CorruptSample], None]  # records a skip, or raises CxrError
GPU_DECODABLE = ("jpeg", "ljpeg", "j2k")  # nvJPEG / nvJPEG2000; DALI decodes PNG on the CPU even in "mixed"
log = logging.getLogger("cxr.data")


class DaliBatches:
    """Runs the plan's batches through a DALI pipeline; yields (images [b,1,R,R], sample ids)."""

    def __init__(self, cfg: DataConfig, index: SplitIndex, resolution: int, epoch: int, augment: bool,
                 native_size: tuple[int, int] | None, size_known: bool, rank: int):
        self.cfg, self.index, self.res, self.epoch, self.augment = cfg, index, resolution, epoch, augment
        self.resize = native_size != (resolution, resolution)
        self.check_size = not self.resize and not size_known  # sized from one header: check the others
        self.device_id = None if cfg.device == "cpu" else local_device_id()
        if cfg.device == "cpu":
            self.decoder = "cpu (DALI threads)"
        elif index.codec in GPU_DECODABLE:
            self.decoder = f"gpu {self.device_id} (DALI mixed)"
            if index.codec == "ljpeg":  # docs/shards-format.md, "Decoding ljpeg"
                self.decoder += "; untested for ljpeg: DALI may run its CPU decoder inside mixed"
        else:
            self.decoder = f"cpu (DALI mixed: {index.codec} has no GPU decoder)"
        log.info("decode: %s shards on %s", index.codec, self.decoder)
        # what the pipeline graph bakes in: equal keys may share one built pipeline
        self.key = (str(index.shard_paths[0]) if len(index.shard_paths) else "", len(index), repr(cfg),
                    resolution, augment, self.resize, self.device_id)

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


def local_device_id() -> int:
    """CUDA device of this process on its node: LOCAL_RANK (torchrun/accelerate/submitit),
    SLURM_LOCALID (srun), else the device torch uses (accelerate has set it)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


class _Built:
    """A built pipeline + iterator, fed by the current epoch's _Feed."""

    def __init__(self, owner: "DaliBatches"):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.feed: _Feed | None = None
        self.exhausted = False  # the last epoch ran to its end: reset before the next
        self.active = False     # an epoch is being iterated now
        self.pipe = _pipeline(owner, lambda: self.feed.source())
        self.it = DALIGenericIterator(self.pipe, ["image"], auto_reset=False, prepare_first_batch=False)


_BUILT: "OrderedDict[tuple, _Built]" = OrderedDict()
_MAX_BUILT = 4  # train + val of a run, with room for an evaluator in the same process


def _built_pipeline(owner: "DaliBatches") -> _Built:
    """The cached pipeline for owner.key, or a new one (cached unless the cached one is busy)."""
    if owner.key in _BUILT and _BUILT[owner.key].active:
        return _Built(owner)  # two loaders of the same split iterated at once: each needs its own
    built = _BUILT.pop(owner.key, None) or _Built(owner)
    _BUILT[owner.key] = built
    while len(_BUILT) > _MAX_BUILT:
        _BUILT.popitem(last=False)
    return built


class _Feed:
    """One pipeline run over a list of batches: the external source and the output side."""

    def __init__(self, owner: DaliBatches, batches: list[np.ndarray], bad: set[int], on_corrupt: OnCorrupt):
        self.o, self.batches, self.bad, self.on_corrupt = owner, iter(batches), bad, on_corrupt
        self._planned = batches
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
                data.append(_prepare(self.o, self.reader, int(i)))
            except CorruptSample as corrupt:
                self.bad.add(int(i))  # a restart must not report it twice
                self.on_corrupt(corrupt)
                continue
            keep.append(int(i))
        if not data:
            raise _all_corrupt(self.o.index, ids)
        ids = np.asarray(keep, np.int64)
        self.pending.append(ids)
        return _outputs(self.o, ids, data)

    def run(self) -> Iterator[tuple[object, np.ndarray]]:
        if self.o.cfg.source_workers:
            yield from self._run_parallel()
            return
        built = _built_pipeline(self.o)
        built.feed = self  # before reset(): resetting prefetches from the source at once
        if built.exhausted:
            built.it.reset()
            built.exhausted = False
        finished, built.active = False, True
        pin = self.o.cfg.pinned and self.o.cfg.device == "cpu"  # "mixed" outputs are already on the GPU
        try:
            for out in built.it:
                image = out[0]["image"]
                # page-locked, so that the loop's non_blocking copy to the GPU does not block
                yield (image.pin_memory() if pin else image), self.pending.popleft()
            finished = True
        finally:
            built.active = False
            if finished:
                built.exhausted = True
            elif _BUILT.get(self.o.key) is built:  # left mid-epoch (break, error): its prefetched
                del _BUILT[self.o.key]                # batches must never reach the next epoch


    def _run_parallel(self) -> Iterator[tuple[object, np.ndarray]]:
        """Batches from a pipeline whose source runs in DALI's worker processes (built for this run only)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        planned = [np.asarray([int(i) for i in b if int(i) not in self.bad], np.int64) for b in self._planned]
        self.pending.extend(planned)  # the next output is always pending[0] (a decode failure names it)
        pipe = _pipeline(self.o, _ParallelSource(self.o, planned))
        pin = self.o.cfg.pinned and self.o.cfg.device == "cpu"
        try:
            it = DALIGenericIterator(pipe, ["image", "id"], auto_reset=False, prepare_first_batch=False)
            for out in _worker_errors(it, self):
                kept = out[0]["id"].numpy().reshape(-1).astype(np.int64)
                for i in np.setdiff1d(self.pending[0], kept):  # dropped by a worker: name it here
                    self.bad.add(int(i))
                    self.on_corrupt(_corruption(self.o, self.reader, int(i)))
                self.pending.popleft()
                image = out[0]["image"]
                yield (image.pin_memory() if pin else image), kept
        finally:
            pool = getattr(pipe, "_py_pool", None)  # DALI closes it at garbage collection; stop the workers now
            if pool is not None:
                pool.close()


class _ParallelSource:
    """Batch callback for DALI's parallel external source: pickled into each worker process.

    Holds this run's planned batches (ids already reported corrupt removed); batch k is
    read, checked and prepared exactly as the serial source does, minus its corrupt
    samples, which the main process re-reads to report (a worker cannot call on_corrupt).
    """

    def __init__(self, owner: DaliBatches, batches: list[np.ndarray]):
        self.o, self.batches, self.reader = owner, batches, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "reader": None}  # file descriptors do not travel

    def __call__(self, info):
        if info.iteration >= len(self.batches):
            raise StopIteration
        if self.reader is None:
            self.reader = SampleReader(self.o.index)
        ids, keep, data = self.batches[info.iteration], [], []
        for i in ids:
            try:
                data.append(_prepare(self.o, self.reader, int(i)))
            except CorruptSample:
                continue
            keep.append(int(i))
        if not data:
            raise _all_corrupt(self.o.index, ids)
        keep = np.asarray(keep, np.int64)
        return (*_outputs(self.o, keep, data), list(keep[:, None]))


def _worker_errors(it, feed: "_Feed"):
    """Iterate `it`; a worker's failure on an all-corrupt batch becomes the serial source's skips + CxrError.

    DALI re-raises a worker's exception as a plain Exception whose cause has lost its type,
    while up to both prefetch depths of earlier batches are still to be output; those
    pending batches are checked again here to find the one whose every sample is corrupt.
    """
    try:
        yield from it
    except Exception as err:
        if type(err) is not Exception or err.__cause__ is None:
            raise  # a DALI operator error (RuntimeError): iterate() locates the sample
        ahead = 2 + max(2, feed.o.cfg.source_workers) + 1  # the pipeline's and the source's prefetch, + 1
        for ids in list(feed.pending)[:ahead]:
            found = []
            for i in ids:
                try:
                    _prepare(feed.o, feed.reader, int(i))
                except CorruptSample as corrupt:
                    found.append(corrupt)
            if found and len(found) == len(ids):
                for corrupt in found:
                    feed.on_corrupt(corrupt)
                raise _all_corrupt(feed.o.index, ids) from None
        raise


def _prepare(o: DaliBatches, reader: SampleReader, i: int) -> np.ndarray:
    """Sample i as the external source hands it to DALI: checked encoded bytes, or resized pixels.

    Raises CorruptSample. crc32 of every member (format /2); for /1 shards libpng checks PNG
    CRCs inside DALI's threads and a failure is located by _find_undecodable.
    """
    image, _, _ = reader.read(i, check_image=False)
    if o.check_size:
        _check_size(image, o.res, reader.index, i)
    if o.resize:  # masters resized on the fly: pixels, with pack's filter
        return _decode_resize(image, o.res, reader.index, i)
    return np.frombuffer(image, np.uint8)


def _corruption(o: DaliBatches, reader: SampleReader, i: int) -> CorruptSample:
    """The CorruptSample a worker found for sample i, found again in this process."""
    try:
        _prepare(o, reader, i)
    except CorruptSample as corrupt:
        return corrupt
    raise CxrError(f"{reader.index.shard_paths[reader.index.shard[i]]}: sample {reader.index.keys[i]} failed in a "
                   "DALI source worker but reads fine here — set data.source_workers=0 and report this")


def _outputs(o: DaliBatches, ids: np.ndarray, data: list[np.ndarray]) -> tuple:
    """The external source's outputs for one batch: images (+ per-sample augmentation parameters)."""
    if not o.augment:
        return (data,)
    params = draw_params([o.index.keys[i] for i in ids], o.cfg, o.epoch, o.res)
    return data, list(params.matrix), list(params.brightness[:, None]), list(params.contrast[:, None])


def _all_corrupt(index: SplitIndex, ids) -> CxrError:
    return all_corrupt_error([index.shard_paths[index.shard[i]] for i in ids], [index.keys[i] for i in ids])


def _pipeline(o: DaliBatches, source):
    from nvidia.dali import fn, math as dmath, pipeline_def, types

    cfg, res, gpu = o.cfg, o.res, o.cfg.device == "gpu"
    workers = cfg.source_workers  # ≥ 1: `source` is a _ParallelSource, whose last output is the kept ids
    # spawn, not fork: a training process has a CUDA context, which a forked worker must not inherit
    parallel = dict(py_num_workers=workers, py_start_method="spawn") if workers else {}

    @pipeline_def(batch_size=max(cfg.batch_size, cfg.eval_batch), num_threads=max(cfg.num_threads, 1),
                  device_id=o.device_id, seed=cfg.resolved_seed, prefetch_queue_depth=2, **parallel)
    def pipe():
        n_out = 4 if o.augment else 1  # augmentation parameters only when augmenting
        dtypes = [types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT][:n_out]
        layouts = ["HWC" if o.resize else "", "", "", ""][:n_out]
        if workers:  # batches computed ahead: at least one per worker
            inputs = fn.external_source(source=source, num_outputs=n_out + 1, batch=True, batch_info=True,
                                        parallel=True, prefetch_queue_depth=max(2, workers),
                                        dtype=dtypes + [types.INT64], layout=layouts + [""])
            image = _graph(inputs[:n_out])
            return image, inputs[n_out]
        inputs = fn.external_source(source=source, num_outputs=n_out, batch=True, dtype=dtypes, layout=layouts)
        return _graph(inputs)

    def _graph(inputs):
        if o.resize:
            # Decoded and resized by the source with `pack --resize`'s filter (DALI's own Lanczos
            # differs from PIL's by up to 16 grey levels on NIH images, its linear by up to 48);
            # pack derived shards (`--resize R`) to keep this off the training path.
            image = inputs[0].gpu() if gpu else inputs[0]
        else:
            image = fn.decoders.image(inputs[0], device="mixed" if gpu else "cpu", output_type=types.GRAY)
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
            from cxr.cuda_check import dali_gpu_advice

            raise CxrError(f"data.device=gpu: DALI could not build a GPU pipeline on device {o.device_id} "
                           f"({str(err).splitlines()[0]}) — {dali_gpu_advice()}") from err
        raise
    return p


def all_corrupt_error(shards: list, keys: list[str]) -> CxrError:
    """Dropping a whole batch would desynchronise the ranks' batch counts (DDP hangs): stop instead."""
    return CxrError(f"{', '.join(sorted(set(map(str, shards))))}: every sample of a batch is corrupt ({keys}) — "
                    "re-pack these shards (python -m shards verify lists all bad samples)")


def _decode_resize(image: bytes, res: int, index: SplitIndex, i: int) -> np.ndarray:
    """Encoded image → uint8 [res, res, 1] with the wds back end's decode and pack's filter."""
    from cxr.data.wds_loader import decode_resize

    return decode_resize(image, res, index, i)[..., None]


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

    from shards.image_codec import decode_ljpeg

    for i in ids:
        try:
            image, _, _ = reader.read(int(i))
        except CorruptSample as corrupt:
            return int(i), corrupt
        try:
            if codec == "ljpeg":
                decode_ljpeg(image)
            else:
                Image.open(io.BytesIO(image)).load()
        except Exception as err:  # any decoder failure marks the sample (BadImage included)
            return int(i), CorruptSample(reader.index.shard_paths[reader.index.shard[i]], reader.index.keys[i],
                                         f"{codec} does not decode ({err})")
    return None
