"""The DALI back end: encoded bytes → decode (CPU, or GPU with device "mixed") → augment → uint8 out
(data.device=cpu; cxr.data.batch.to_device makes it float on the training device), or normalised on the GPU ("mixed").

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

This module is the loader object; the pipeline cache and the external source that feeds it are
in cxr.data.dali_feed, the DALI graph and its memory estimate in cxr.data.dali_pipeline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np

from cxr.data.config import DataConfig
from cxr.data.dali_feed import _Feed, _find_undecodable
from cxr.data.dali_pipeline import GPU_DECODABLE, dali_memory_estimate  # noqa: F401  (dali_memory_estimate: re-exported)
from cxr.data.shard_index import OnCorrupt, SampleReader, SplitIndex
from cxrbase.errors import CxrError

log = logging.getLogger("cxr.data")


class DaliBatches:
    """Runs the plan's batches through a DALI pipeline; yields (images [b,1,R,R], sample ids, labels, meta,
    intensity): uint8 images with (brightness, contrast) float32 [b] when augmenting for data.device=cpu,
    the normalised float32 images on the GPU and None for "mixed" (cxr.data.batch).

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
