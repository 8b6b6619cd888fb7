"""The DALI graph of the loader (decode on the CPU or the GPU, resize, augment; normalise under mixed) and
DALI's memory outside torch's allocator (issue 22 item 6): the pipeline's threads, the decoders'
padding and an estimate of a pipeline's device and pinned memory (docs/cluster.md)."""

from __future__ import annotations

from typing import Any

from cxr.data.config import DataConfig
from cxr.data.workers import stop_signals_blocked
from cxrbase.errors import CxrError

Loader = Any  # the cxr.data.dali_loader.DaliBatches a pipeline serves (that module imports this one)
GPU_DECODABLE = ("jpeg", "ljpeg", "j2k")  # nvJPEG / nvJPEG2000; DALI decodes PNG on the CPU even in "mixed"


def _pipeline(o: Loader, source):
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
            return _graph(inputs[:n_out]), inputs[n_out], inputs[n_out + 1], *_intensity(inputs), inputs[n_out + 2]
        inputs = fn.external_source(source=source, num_outputs=n_out + 2, batch=True, dtype=dtypes, layout=layouts)
        return _graph(inputs[:n_out]), inputs[n_out], inputs[n_out + 1], *_intensity(inputs)

    def _intensity(inputs) -> tuple:
        # uint8 out (data.device=cpu): the per-sample brightness and contrast travel beside the image
        # to cxr.data.batch.to_device, which applies them on the training device
        return (inputs[2], inputs[3]) if o.augment and not gpu else ()

    def _graph(inputs):
        if o.resize:
            # Decoded and resized by the source with `pack --resize`'s filter (DALI's own Lanczos
            # differs from PIL's by up to 16 grey levels on NIH images, its linear by up to 48);
            # pack derived shards (`--resize R`) to keep this off the training path.
            image = inputs[0].gpu() if gpu else inputs[0]
        else:
            image = _decode(inputs[0], gpu, o.native_size)
        if o.augment:
            matrix = inputs[1]
            image = fn.warp_affine(
                image, matrix=matrix, size=[res, res], fill_value=0, interp_type=types.INTERP_LINEAR, inverse_map=True
            )
        if not gpu:  # uint8 HWC out: pinned and copied as bytes, made float on the device (cxr.data.batch)
            return image
        # mixed: the output is in device memory already, so the float steps stay in the graph here
        if not o.augment:
            return fn.crop_mirror_normalize(
                image, dtype=types.FLOAT, output_layout="CHW", mean=[cfg.mean * 255], std=[cfg.std * 255]
            )
        bright, contrast = inputs[2:]
        x = fn.cast(image, dtype=types.FLOAT) / 255.0
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


def output_names(o: Loader) -> list[str]:
    """Names of the pipeline's outputs, in order: image, labels, meta, then — data.device=cpu and
    augmenting — brightness and contrast (to_device applies them), then "id" from a parallel source."""
    names = ["image", "labels", "meta"]
    if o.augment and o.cfg.device != "gpu":
        names += ["brightness", "contrast"]
    return names + (["id"] if o.cfg.source_workers else [])


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
    uint8 output handed to torch (d · b·R²; cxr.data.batch.to_device makes it float on the device).
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
        outputs = PREFETCH * b * r2 if cfg.pinned else 0
        detail = {"pinned_outputs": outputs}
        device, pinned = 0, outputs
    return {
        "device": device * pipelines,
        "pinned": pinned * pipelines,
        "threads": threads,
        "detail": {k: v * pipelines for k, v in detail.items()},
    }
