"""The DALI loader's feeding side: the cache of built pipelines (one per split, reused across
epochs), the external source that reads, checks and (with on-the-fly resizing) decodes + resizes
each planned batch ahead in threads or in worker processes, and the corrupt samples it reports
through the loader's ``on_corrupt`` (see cxr.data.dali_loader)."""

from __future__ import annotations

import io
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cxr.data.augmentation import draw_params
from cxr.data.dali_pipeline import Loader, _pipeline, output_names
from cxr.data.shard_index import CorruptSample, OnCorrupt, SampleReader, SplitIndex, all_corrupt_error, decode_resize
from cxrbase.errors import CxrError

RESIZE_AHEAD = 2  # batches decoded + resized ahead of the one DALI asks for (on-the-fly resizing)


class _Built:
    """A built pipeline + iterator, fed by the current epoch's _Feed."""

    def __init__(self, owner: Loader):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.feed: _Feed | None = None
        self.exhausted = False  # the last epoch ran to its end: reset before the next
        self.active = False  # an epoch is being iterated now
        self.pipe = _pipeline(owner, lambda: self.feed.source())
        self.it = DALIGenericIterator(self.pipe, output_names(owner), auto_reset=False, prepare_first_batch=False)


_BUILT: OrderedDict[tuple, _Built] = OrderedDict()
_MAX_BUILT = 4  # train + val of a run, with room for an evaluator in the same process


def _built_pipeline(owner: Loader) -> _Built:
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

    def __init__(self, owner: Loader, batches: list[np.ndarray], bad: set[int], on_corrupt: OnCorrupt):
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
        try:
            for out in built.it:
                yield self._handed_over(out[0], self.pending.popleft())
            finished = True
        finally:
            built.active = False
            if finished:
                built.exhausted = True
            elif _BUILT.get(self.o.key) is built:  # left mid-epoch (break, error): its prefetched
                del _BUILT[self.o.key]  # batches must never reach the next epoch

    def _handed_over(self, out: dict, ids: np.ndarray) -> tuple:
        """One pipeline output as the loader's backend tuple (images, ids, labels, meta, intensity).

        data.device=cpu: the image is uint8 HWC, viewed as [b,1,R,R] and — pinned batches — page-locked
        (1 byte per pixel) so that the consumer's non_blocking copy to the GPU does not block; intensity
        is (brightness, contrast) float32 [b] when augmenting (cxr.data.batch.to_device applies both).
        "mixed": the image is the normalised float32 [b,1,R,R] already on the GPU, intensity None."""
        image, intensity = out["image"], None
        if self.o.cfg.device != "gpu":
            image = image.permute(0, 3, 1, 2)
            if self.o.cfg.pinned:
                image = image.pin_memory()
            if self.o.augment:
                intensity = (out["brightness"].reshape(-1), out["contrast"].reshape(-1))
        return image, ids, *_fields(out), intensity

    def _run_parallel(self) -> Iterator[tuple]:
        """Batches from a pipeline whose source runs in DALI's worker processes (built for this run only)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        planned = [np.asarray([int(i) for i in b if int(i) not in self.bad], np.int64) for b in self._planned]
        self.pending.extend(planned)  # the next output is always pending[0] (a decode failure names it)
        pipe = _pipeline(self.o, _ParallelSource(self.o, planned))
        try:
            it = DALIGenericIterator(pipe, output_names(self.o), auto_reset=False, prepare_first_batch=False)
            for out in _worker_errors(it, self):
                kept = out[0]["id"].numpy().reshape(-1).astype(np.int64)
                for i in np.setdiff1d(self.pending[0], kept):  # dropped by a worker: name it here
                    self.bad.add(int(i))
                    self.on_corrupt(_corruption(self.o, self.reader, int(i)))
                self.pending.popleft()
                yield self._handed_over(out[0], kept)
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

    def __init__(self, owner: Loader, batches: list[np.ndarray]):
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


def _prepare(o: Loader, reader: SampleReader, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample i as the external source hands it to DALI: (checked encoded bytes or resized pixels,
    labels, meta) — all three from one read.

    Raises CorruptSample. crc32 of every member (format /2); for /1 shards libpng checks PNG
    CRCs inside DALI's threads and a failure is located by _find_undecodable.
    """
    image, labels, meta = _read_checked(o, reader, i)
    if o.resize:  # masters resized on the fly: pixels, with pack's filter
        return _decode_resize(image, o.res, reader.index, i), labels, meta
    return np.frombuffer(image, np.uint8), labels, meta


def _read_checked(o: Loader, reader: SampleReader, i: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Sample i's (encoded image, labels, meta), every member checked in one read (and the image's
    size, when sized from one header)."""
    image, labels, meta = reader.read(i, check_image=False)
    if o.check_size:
        _check_size(image, o.res, reader.index, i)
    return image, labels, meta


def _corruption(o: Loader, reader: SampleReader, i: int) -> CorruptSample:
    """The CorruptSample a worker found for sample i, found again in this process."""
    try:
        _prepare(o, reader, i)
    except CorruptSample as corrupt:
        return corrupt
    raise CxrError(
        f"{reader.index.shard_paths[reader.index.shard[i]]}: sample {reader.index.keys[i]} failed in a "
        "DALI source worker but reads fine here — set data.source_workers=0 and report this"
    )


def _outputs(o: Loader, ids: np.ndarray, data: list[tuple]) -> tuple:
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
