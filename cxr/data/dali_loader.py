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
from shards.errors import CxrError
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
                # crc32 of every member (format /2); for /1 shards libpng checks PNG CRCs inside
                # DALI's threads and a failure is located by _find_undecodable
                image, _, _ = self.reader.read(int(i), check_image=False)
                if self.o.check_size:
                    _check_size(image, self.o.res, self.reader.index, int(i))
                if self.o.resize:  # masters resized on the fly: pixels, with pack's filter
                    pixels = _decode_resize(image, self.o.res, self.reader.index, int(i))
            except CorruptSample as corrupt:
                self.bad.add(int(i))  # a restart must not report it twice
                self.on_corrupt(corrupt)
                continue
            keep.append(int(i))
            data.append(pixels if self.o.resize else np.frombuffer(image, np.uint8))
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


def _pipeline(o: DaliBatches, source):
    from nvidia.dali import fn, math as dmath, pipeline_def, types

    cfg, res, gpu = o.cfg, o.res, o.cfg.device == "gpu"

    @pipeline_def(batch_size=max(cfg.batch_size, cfg.eval_batch), num_threads=max(cfg.num_threads, 1),
                  device_id=o.device_id, seed=cfg.resolved_seed, prefetch_queue_depth=2)
    def pipe():
        n_out = 4 if o.augment else 1  # augmentation parameters only when augmenting
        inputs = fn.external_source(source=source, num_outputs=n_out, batch=True,
                                    dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT][:n_out],
                                    layout=["HWC" if o.resize else "", "", "", ""][:n_out])
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
            raise CxrError(f"data.device=gpu: DALI could not build a GPU pipeline on device {o.device_id} "
                           f"({str(err).splitlines()[0]}) — run on a CUDA machine or set data.device=cpu") from err
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
