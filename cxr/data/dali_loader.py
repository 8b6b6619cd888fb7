"""The DALI back end: encoded bytes → decode (CPU, or GPU with device "mixed") → augment → normalize.

Resizing on the fly (masters at another resolution than asked) decodes and resizes in the
external source with `pack --resize`'s decoder and filter (shards.image_codec.decode_grey,
resize_grey), so both back ends and derived shards give the same pixels; the serial source
runs them in data.num_threads threads, batches ahead (both release the GIL). Derived `resN/`
shards avoid that cost. Why not DALI's own resize, or on the GPU under "mixed": DALI's
Lanczos differs from PIL's by up to 16 grey levels on NIH images, so derived shards (packed
on CPU login nodes, where pack imports neither DALI nor torch) would no longer match; the
decode, not the resize, is most of the cost (PNG decodes on the CPU even in "mixed").

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
loader is built, and the first batch of each pass checks that a GPU-decodable codec really
decodes on the GPU and that no image came out flat where its bytes hold pixels
(DaliBatches._check_first_batch; docs/shards-format.md, "Decoding ljpeg"). The GPU path has
not run in this repository (no GPU on its test machines).
"""

from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cxr.data.augmentation import draw_params
from cxr.data.config import DataConfig
from cxr.data.shard_index import CorruptSample, OnCorrupt, SampleReader, SplitIndex, all_corrupt_error, decode_resize
from cxr.data.workers import stop_signals_blocked
from cxrbase.errors import CxrError

GPU_DECODABLE = ("jpeg", "ljpeg", "j2k")  # nvJPEG / nvJPEG2000; DALI decodes PNG on the CPU even in "mixed"
log = logging.getLogger("cxr.data")
RESIZE_AHEAD = 2  # batches decoded + resized ahead of the one DALI asks for (on-the-fly resizing)


class DaliBatches:
    """Runs the plan's batches through a DALI pipeline; yields (images [b,1,R,R], sample ids, labels, meta).

    Labels (uint8 [b, L]) and meta (float32 [b, 5]) come from the same checked read as the
    image and travel through the pipeline beside it, so a shard cut or replaced after the read
    cannot pair an image with other (or missing) label bytes."""

    def __init__(
        self,
        cfg: DataConfig,
        index: SplitIndex,
        resolution: int,
        epoch: int,
        augment: bool,
        native_size: tuple[int, int] | None,
        size_known: bool,
        rank: int,
    ):
        self.cfg, self.index, self.res, self.epoch, self.augment = cfg, index, resolution, epoch, augment
        self.resize = native_size != (resolution, resolution)
        self.native_size = native_size  # sizes the mixed decoder's buffers (None: mixed sizes)
        self.check_size = not self.resize and not size_known  # sized from one header: check the others
        self.device_id = None if cfg.device == "cpu" else local_device_id()
        if cfg.device == "cpu":
            self.decoder = "cpu (DALI threads)"
        elif index.codec in GPU_DECODABLE:
            self.decoder = f"gpu {self.device_id} (DALI mixed)"
            if index.codec == "ljpeg":  # docs/shards-format.md, "Decoding ljpeg"
                self.decoder += "; GPU use checked on the first batch (DALI may run its CPU decoder inside mixed)"
        else:
            self.decoder = f"cpu (DALI mixed: {index.codec} has no GPU decoder)"
        log.info("decode: %s shards on %s", index.codec, self.decoder)
        # what the pipeline graph bakes in: equal keys may share one built pipeline
        self.key = (
            str(index.shard_paths[0]) if len(index.shard_paths) else "",
            len(index),
            repr(cfg),
            resolution,
            augment,
            self.resize,
            self.device_id,
        )

    def iterate(self, batches: list[np.ndarray], on_corrupt: OnCorrupt) -> Iterator[tuple]:
        """Yield every planned batch minus corrupt samples; a decoder failure restarts at that batch."""
        bad: set[int] = set()
        pos = 0
        while pos < len(batches):
            feed = _Feed(self, batches[pos:], bad, on_corrupt)
            try:
                for batch in feed.run():
                    if pos == 0:
                        self._check_first_batch(batch[0], batch[1], feed.reader)
                    yield batch
                    pos += 1
                return
            except RuntimeError:  # DALI decode failure: the integrity check could not see it
                ids = feed.pending[0] if feed.pending else np.empty(0, np.int64)
                found = _find_undecodable(feed.reader, ids, self.index.codec)
                if found is None:
                    raise
                on_corrupt(found[1])  # raises in eval / strict
                bad.add(found[0])
            finally:
                feed.close()

    def _check_first_batch(self, images, ids: np.ndarray, reader: SampleReader) -> None:
        """The two silent failures of GPU decoding, looked for on the first batch of each pass.

        1. DALI's "mixed" decoder falls back to its CPU decoder, without a word, for a stream
           nvJPEG refuses (e.g. lossless JPEG on nvJPEG < 12.2 or compute capability < 6.0):
           the first sample is tried with nvImageCodec's GPU backends only (the library DALI
           decodes with), and a refusal is logged once per process.
        2. nvJPEG's lossless path returned all-zero images before 13.0.2: an image that comes
           out constant is decoded again on the CPU (pack's decoder), and if its checked bytes
           hold varying pixels the run stops. Cost: one min/max per image of one batch.
        """
        if self.decoder.startswith("gpu") and not self.resize and len(ids):
            _warn_if_not_on_gpu(reader.read(int(ids[0]))[0], self.index.codec, self.device_id)
        if self.resize:  # pixels decoded by the source with pack's CPU decoder
            return
        flat = images.reshape(images.shape[0], -1)
        constant = (flat.amax(1) == flat.amin(1)).cpu().numpy()
        for j in np.flatnonzero(constant):
            i = int(ids[j])
            image, _, _ = reader.read(i)  # crc32-checked bytes
            from shards.image_codec import decode_grey

            pixels = np.asarray(decode_grey(image, self.index.codec))
            if pixels.min() != pixels.max():
                raise CxrError(
                    f"{self.index.shard_paths[self.index.shard[i]]}: sample {self.index.keys[i]} came out of DALI "
                    f"({self.decoder}) as one flat value, but its bytes pass their checks and decode to pixels "
                    f"{pixels.min()}..{pixels.max()} on the CPU — nvJPEG's lossless decoder returned all-zero images "
                    "before CUDA 13.0.2's nvJPEG: upgrade nvJPEG, or set data.device=cpu"
                )


_NOT_ON_GPU_SAID: set[str] = set()


def _warn_if_not_on_gpu(sample: bytes, codec: str, device_id: int | None) -> None:
    """Log once per codec when nvImageCodec's GPU backends cannot decode `sample` (DALI mixed then uses its CPU)."""
    if codec in _NOT_ON_GPU_SAID:
        return
    _NOT_ON_GPU_SAID.add(codec)
    why = gpu_decode_refusal(sample, device_id or 0)
    if why:
        log.warning(
            "decode: %s shards decode on the CPU inside DALI mixed, not on GPU %s (%s); each decoder "
            "thread is then a CPU decoder — raise data.num_threads or pack jpeg shards",
            codec,
            device_id,
            why,
        )


def gpu_decode_refusal(sample: bytes, device_id: int = 0) -> str | None:
    """None when nvImageCodec's GPU backends (nvJPEG, its hardware decoder, nvJPEG2000) decode `sample`, else why not."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return "nvidia-nvimgcodec is not importable, so whether the GPU decodes cannot be checked"
    try:
        backends = [
            nvimgcodec.Backend(kind)
            for kind in (
                nvimgcodec.BackendKind.GPU_ONLY,
                nvimgcodec.BackendKind.HYBRID_CPU_GPU,
                nvimgcodec.BackendKind.HW_GPU_ONLY,
            )
        ]
        image = nvimgcodec.Decoder(device_id=device_id, backends=backends).decode(sample)
    except Exception as err:  # noqa: BLE001 — nvImageCodec raises RuntimeError / ValueError on unsupported streams
        return f"nvImageCodec GPU decoders: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None if image is not None else "nvImageCodec's GPU decoders refused the stream"


def cached_shards(cfg: DataConfig, split: str) -> tuple[str, float]:
    """(local folder to read, seconds spent) for data.shards: itself when local; for a URL, its
    node-local mirror in data.cache_dir holding `split`'s shards (shards.cache: DALI reads files)."""
    from shards.cache import ShardCache
    from shards.remote import is_url

    if not is_url(cfg.shards):
        return cfg.shards, 0.0
    done = ShardCache(cfg.cache_dir, cfg.cache_max_gb).ensure(cfg.shards, [split], cfg.resolution)
    return str(done.folder), done.seconds


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

    def __init__(self, owner: DaliBatches):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.feed: _Feed | None = None
        self.exhausted = False  # the last epoch ran to its end: reset before the next
        self.active = False  # an epoch is being iterated now
        self.pipe = _pipeline(owner, lambda: self.feed.source())
        self.it = DALIGenericIterator(self.pipe, list(OUTPUTS), auto_reset=False, prepare_first_batch=False)


OUTPUTS = ("image", "labels", "meta")  # the pipeline's outputs (+ "id" from a parallel source)
_BUILT: OrderedDict[tuple, _Built] = OrderedDict()
_MAX_BUILT = 4  # train + val of a run, with room for an evaluator in the same process


def _built_pipeline(owner: DaliBatches) -> _Built:
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
        # resizing masters: decode + resize in cfg.num_threads threads (the serial source only;
        # source_workers decode in their own processes), batches queued in `ahead`
        self.pool = (
            ThreadPoolExecutor(max(owner.cfg.num_threads, 1), thread_name_prefix="cxr-resize")
            if owner.resize and not owner.cfg.source_workers
            else None
        )
        self.ahead: deque[tuple[np.ndarray, list]] = deque()

    def source(self):
        """External source callback: next batch's encoded images (+ augmentation params)."""
        if self.pool is not None:
            return self._source_resized()
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

    def _source_resized(self):
        """source() when masters are resized on the fly: decode + resize run in `pool`, batches ahead.

        Reads and checksums stay on this thread (one SampleReader, a few preads per image);
        each checked image is decoded and resized by a pool thread (imagecodecs / PIL release
        the GIL), RESIZE_AHEAD batches ahead of the one DALI asks for, so the pool works
        while DALI and the training step run. Skips and their order are the serial path's.
        """
        while len(self.ahead) <= RESIZE_AHEAD:
            ids = next(self.batches, None)
            if ids is None:
                break
            jobs = []
            for i in map(int, ids):
                if i in self.bad:
                    continue
                try:
                    image, labels, meta = _read_checked(self.o, self.reader, i)
                except CorruptSample as corrupt:
                    jobs.append((i, corrupt, None, None))
                    continue
                jobs.append((i, self.pool.submit(_decode_resize, image, self.o.res, self.o.index, i), labels, meta))
            self.ahead.append((ids, jobs))
        if not self.ahead:
            raise StopIteration  # the epoch's last batch was handed over
        ids, jobs = self.ahead.popleft()
        keep, data = [], []
        for i, job, labels, meta in jobs:
            try:
                if isinstance(job, CorruptSample):
                    raise job
                data.append((job.result(), labels, meta))
            except CorruptSample as corrupt:
                self.bad.add(i)
                self.on_corrupt(corrupt)
                continue
            keep.append(i)
        if not data:
            raise _all_corrupt(self.o.index, ids)
        keep = np.asarray(keep, np.int64)
        self.pending.append(keep)
        return _outputs(self.o, keep, data)

    def close(self) -> None:
        """Close the reader and stop the resize pool (queued decodes of an abandoned epoch are dropped)."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.reader.close()

    def run(self) -> Iterator[tuple]:
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
                yield ((image.pin_memory() if pin else image), self.pending.popleft(), *_fields(out[0]))
            finished = True
        finally:
            built.active = False
            if finished:
                built.exhausted = True
            elif _BUILT.get(self.o.key) is built:  # left mid-epoch (break, error): its prefetched
                del _BUILT[self.o.key]  # batches must never reach the next epoch

    def _run_parallel(self) -> Iterator[tuple]:
        """Batches from a pipeline whose source runs in DALI's worker processes (built for this run only)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        planned = [np.asarray([int(i) for i in b if int(i) not in self.bad], np.int64) for b in self._planned]
        self.pending.extend(planned)  # the next output is always pending[0] (a decode failure names it)
        pipe = _pipeline(self.o, _ParallelSource(self.o, planned))
        pin = self.o.cfg.pinned and self.o.cfg.device == "cpu"
        try:
            it = DALIGenericIterator(pipe, [*OUTPUTS, "id"], auto_reset=False, prepare_first_batch=False)
            for out in _worker_errors(it, self):
                kept = out[0]["id"].numpy().reshape(-1).astype(np.int64)
                for i in np.setdiff1d(self.pending[0], kept):  # dropped by a worker: name it here
                    self.bad.add(int(i))
                    self.on_corrupt(_corruption(self.o, self.reader, int(i)))
                self.pending.popleft()
                image = out[0]["image"]
                yield ((image.pin_memory() if pin else image), kept, *_fields(out[0]))
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


def _worker_errors(it, feed: _Feed):
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


def _prepare(o: DaliBatches, reader: SampleReader, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample i as the external source hands it to DALI: (checked encoded bytes or resized pixels,
    labels, meta) — all three from one read.

    Raises CorruptSample. crc32 of every member (format /2); for /1 shards libpng checks PNG
    CRCs inside DALI's threads and a failure is located by _find_undecodable.
    """
    image, labels, meta = _read_checked(o, reader, i)
    if o.resize:  # masters resized on the fly: pixels, with pack's filter
        return _decode_resize(image, o.res, reader.index, i), labels, meta
    return np.frombuffer(image, np.uint8), labels, meta


def _read_checked(o: DaliBatches, reader: SampleReader, i: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Sample i's (encoded image, labels, meta), every member checked in one read (and the image's
    size, when sized from one header)."""
    image, labels, meta = reader.read(i, check_image=False)
    if o.check_size:
        _check_size(image, o.res, reader.index, i)
    return image, labels, meta


def _corruption(o: DaliBatches, reader: SampleReader, i: int) -> CorruptSample:
    """The CorruptSample a worker found for sample i, found again in this process."""
    try:
        _prepare(o, reader, i)
    except CorruptSample as corrupt:
        return corrupt
    raise CxrError(
        f"{reader.index.shard_paths[reader.index.shard[i]]}: sample {reader.index.keys[i]} failed in a "
        "DALI source worker but reads fine here — set data.source_workers=0 and report this"
    )


def _outputs(o: DaliBatches, ids: np.ndarray, data: list[tuple]) -> tuple:
    """The external source's outputs for one batch: images (+ per-sample augmentation parameters), labels, meta."""
    images, labels, meta = (list(x) for x in zip(*data))
    if not o.augment:
        return images, labels, meta
    params = draw_params([o.index.keys[i] for i in ids], o.cfg, o.epoch, o.res)
    return images, list(params.matrix), list(params.brightness[:, None]), list(params.contrast[:, None]), labels, meta


def _fields(out: dict) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 [b, L], meta float32 [b, 5]) of one pipeline output, as numpy on the CPU."""
    return out["labels"].cpu().numpy(), out["meta"].cpu().numpy()


def _all_corrupt(index: SplitIndex, ids) -> CxrError:
    return all_corrupt_error([index.shard_paths[index.shard[i]] for i in ids], [index.keys[i] for i in ids])


def _pipeline(o: DaliBatches, source):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    cfg, res, gpu = o.cfg, o.res, o.cfg.device == "gpu"
    workers = cfg.source_workers  # ≥ 1: `source` is a _ParallelSource, whose last output is the kept ids
    # spawn, not fork: a training process has a CUDA context, which a forked worker must not inherit
    parallel = dict(py_num_workers=workers, py_start_method="spawn") if workers else {}

    @pipeline_def(
        batch_size=max(cfg.batch_size, cfg.eval_batch),
        num_threads=pipeline_threads(cfg, o.index.codec),
        device_id=o.device_id,
        seed=cfg.resolved_seed,
        prefetch_queue_depth=PREFETCH,
        **parallel,
    )
    def pipe():
        n_out = 4 if o.augment else 1  # augmentation parameters only when augmenting
        # + labels and meta, passed through untouched (read with the image: _prepare)
        dtypes = [types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT][:n_out] + [types.UINT8, types.FLOAT]
        layouts = ["HWC" if o.resize else "", "", "", ""][:n_out] + ["", ""]
        if workers:  # batches computed ahead: at least one per worker
            inputs = fn.external_source(
                source=source,
                num_outputs=n_out + 3,
                batch=True,
                batch_info=True,
                parallel=True,
                prefetch_queue_depth=max(2, workers),
                dtype=dtypes + [types.INT64],
                layout=layouts + [""],
            )
            return _graph(inputs[:n_out]), inputs[n_out], inputs[n_out + 1], inputs[n_out + 2]
        inputs = fn.external_source(source=source, num_outputs=n_out + 2, batch=True, dtype=dtypes, layout=layouts)
        return _graph(inputs[:n_out]), inputs[n_out], inputs[n_out + 1]

    def _graph(inputs):
        if o.resize:
            # Decoded and resized by the source with `pack --resize`'s filter (DALI's own Lanczos
            # differs from PIL's by up to 16 grey levels on NIH images, its linear by up to 48);
            # pack derived shards (`--resize R`) to keep this off the training path.
            image = inputs[0].gpu() if gpu else inputs[0]
        else:
            image = _decode(inputs[0], gpu, o.native_size)
        if not o.augment:
            return fn.crop_mirror_normalize(
                image, dtype=types.FLOAT, output_layout="CHW", mean=[cfg.mean * 255], std=[cfg.std * 255]
            )
        matrix, bright, contrast = inputs[1:]
        image = fn.warp_affine(
            image, matrix=matrix, size=[res, res], fill_value=0, interp_type=types.INTERP_LINEAR, inverse_map=True
        )
        x = fn.cast(image, dtype=types.FLOAT) / 255.0
        if gpu:
            bright, contrast = bright.gpu(), contrast.gpu()
        y = dmath.clamp(bright * (0.5 + contrast * (x - 0.5)), 0.0, 1.0)
        return fn.transpose((y - cfg.mean) / cfg.std, perm=[2, 0, 1])

    p = pipe()
    try:
        with stop_signals_blocked():  # source workers (spawned by build) must survive the job's stop signals
            p.build()
    except RuntimeError as err:
        if gpu:
            from cxr.cuda_check import dali_gpu_advice

            raise CxrError(
                f"data.device=gpu: DALI could not build a GPU pipeline on device {o.device_id} "
                f"({str(err).splitlines()[0]}) — {dali_gpu_advice()}"
            ) from err
        raise
    return p


def _decode(data, gpu: bool, native_size: tuple[int, int] | None):
    """fn.decoders.image to grey; in "mixed", per-thread buffers sized for these images (decoder_padding)."""
    from nvidia.dali import fn, types

    if not gpu:
        return fn.decoders.image(data, device="cpu", output_type=types.GRAY)
    device_pad, host_pad = decoder_padding(native_size)
    return fn.decoders.image(
        data,
        device="mixed",
        output_type=types.GRAY,
        device_memory_padding=device_pad,
        host_memory_padding=host_pad,
        device_memory_padding_jpeg2k=device_pad,
        host_memory_padding_jpeg2k=host_pad,
    )


# ----- DALI's memory outside torch's allocator (issue 22 item 6) -----
PREFETCH = 2  # the pipeline's prefetch_queue_depth
MIXED_GPU_CODEC_THREADS = 4  # mixed + a GPU-decoded codec: CPU threads only parse streams and feed nvJPEG
PNG_DECODE_PER_CORE = 95  # 1024² NIH PNG, images per CPU-second (bench/RESULTS.md, codec decode / loader from masters)
DEFAULT_PADDING = (16 << 20, 8 << 20)  # DALI's defaults: 16 MiB device per thread, 2 × 8 MiB pinned per thread


def decoder_padding(native_size: tuple[int, int] | None) -> tuple[int, int]:
    """(device_memory_padding, host_memory_padding) in bytes for grey images of native_size.

    DALI preallocates, per decoder thread, one device buffer of device_memory_padding and two
    pinned host buffers of host_memory_padding (its defaults, 16 MiB and 8 MiB, suit 4k RGB
    photos). A w×h grey image decodes into w·h bytes, lossless JPEG through uint16 (2 bytes
    per pixel, converted back: DALI PR 4572), so the device buffer is 2·w·h; the host side
    holds the encoded stream, at most ~w·h bytes for 8-bit grey. Larger images still decode:
    the decoder then reallocates. Unknown sizes (mixed masters) keep DALI's defaults.
    """
    if native_size is None:
        return DEFAULT_PADDING
    pixels = native_size[0] * native_size[1]
    return 2 * pixels, pixels


def pipeline_threads(cfg: DataConfig, codec: str) -> int:
    """DALI CPU threads: data.num_threads, capped at MIXED_GPU_CODEC_THREADS when the GPU decodes.

    PNG decodes on the CPU even in "mixed" (~95 images per core-second at 1024², ~65 with
    the resize to 224), so each thread is a decoder there and the profile's count stands;
    JPEG / lossless JPEG / JPEG 2000 decode on the GPU, where more CPU threads only add
    per-thread decoder buffers (decoder_padding) without speed.
    """
    threads = max(cfg.num_threads, 1)
    if cfg.device == "gpu" and codec in GPU_DECODABLE:
        return min(threads, MIXED_GPU_CODEC_THREADS)
    return threads


def dali_memory_estimate(
    cfg: DataConfig, codec: str = "png", native_size: tuple[int, int] | None = (1024, 1024), pipelines: int = 2
) -> dict:
    """Bytes DALI holds outside torch's allocator for `pipelines` pipelines (train + val of a run).

    For the probe and the memory claim (cxr/training/probe.py, bench/gpu_check.py): a model of the
    pipeline built by _pipeline, not a measurement — gpu_check's "dali memory" row measures
    it on a GPU. Returns {"device": bytes on the GPU, "pinned": page-locked host bytes,
    "threads": decoder threads, "detail": {...}}. Zero device bytes for data.device=cpu.

    Per pipeline, with b = max(batch_size, eval batch), R = resolution, N = native pixels,
    d = PREFETCH: decoder buffers (threads × device padding; 2 × threads × host padding
    pinned, mixed only) + the GPU stage outputs, each kept d deep — decoded uint8 b·N,
    warped uint8 b·R², float32 stages 4·b·R² (cast, arithmetic, transpose: 3 with
    augmentation, crop_mirror_normalize: 1 without) — and, for data.device=cpu, the pinned
    float32 output handed to torch (d · 4·b·R²).
    """
    threads = pipeline_threads(cfg, codec)
    b, r2 = max(cfg.batch_size, cfg.eval_batch), cfg.resolution**2
    n = native_size[0] * native_size[1] if native_size else r2
    float_stages = 3 if cfg.augment else 1
    if cfg.device == "gpu":
        device_pad, host_pad = decoder_padding(native_size)
        decoder_device = threads * device_pad
        decoder_pinned = 2 * threads * host_pad
        stages = PREFETCH * b * (n + (r2 if cfg.augment else 0) + 4 * r2 * float_stages)
        detail = {"decoder_device": decoder_device, "decoder_pinned": decoder_pinned, "stage_outputs": stages}
        device, pinned = decoder_device + stages, decoder_pinned
    else:
        outputs = PREFETCH * 4 * b * r2 if cfg.pinned else 0
        detail = {"pinned_outputs": outputs}
        device, pinned = 0, outputs
    return {
        "device": device * pipelines,
        "pinned": pinned * pipelines,
        "threads": threads,
        "detail": {k: v * pipelines for k, v in detail.items()},
    }


def _decode_resize(image: bytes, res: int, index: SplitIndex, i: int) -> np.ndarray:
    """Encoded image → uint8 [res, res, 1] with the wds back end's decode and pack's filter."""
    return decode_resize(image, res, index, i)[..., None]


def _check_size(image: bytes, res: int, index: SplitIndex, i: int) -> None:
    from PIL import Image

    size = Image.open(io.BytesIO(image)).size  # header only
    if size != (res, res):
        raise CorruptSample(
            index.shard_paths[index.shard[i]],
            index.keys[i],
            f"is {size[0]}×{size[1]} but the shards' first sample is {res}×{res} "
            "(mixed sizes: pack derived shards with --resize)",
        )


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
            return int(i), CorruptSample(
                reader.index.shard_paths[reader.index.shard[i]],
                reader.index.keys[i],
                f"{codec} does not decode ({err})",
            )
    return None
