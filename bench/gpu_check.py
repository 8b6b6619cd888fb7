"""One-shot GPU check: what only a GPU answers, most valuable first, in ≤ 6 minutes on an H200.

    python bench/gpu_check.py --out "$OUT/gpu_check.md"          # CUDA, defaults below (budget 360 s)
    python bench/gpu_check.py --device cpu --out smoke.md        # tiny CPU smoke (the test suite runs it)

Every training row calls ``cxr.train.train(cfg, loader_fn=...)`` — the real loop with
accelerate, autocast, the stop flag, validation and checkpoint writes — with bf16 autocast
and channels_last. Rows, in the order they run (a row whose estimate does not fit what is
left of ``--budget-s`` is skipped with a note; the start prints the run's own estimate):

  throughput   DenseNet-121 img/s at 512 and 1024, eager, without checkpointing, timed from
               batch --warmup to the end of the epoch (CUDA-synchronised at both ends)
  checkpoint   the same with model.grad_checkpointing=true (after each throughput row)
  compile      train.compile=true without and with checkpointing at 1024 (inductor; without
               a C compiler aot_eager, said in the header: no fused kernels)
  probe        cxr.training.probe's choice at 1024 for effective batch --batch and its predicted peak
               (reserved + non-torch overhead) against the training row at the same layout
               (device_est_mib), or the probe's own confirming step
  png decode   PIL decode of the real NIH sample PNGs on one core: img/s per core, which
               sizes the CPU decoder threads per GPU (PNG never decodes on the GPU)
  resume       train.deterministic=true: run A uninterrupted; run B stopped by SIGUSR1
               mid-epoch (exit 75), then resumed; 1 = final weights bitwise equal (the next
               train() resets the deterministic numerics)
  compile      the compiled rows at the other resolutions (512): first to be skipped
  --extra      max batch (doubling then bisection to the OOM edge), jpeg decode
               (torchvision.io.decode_jpeg on the device), dali memory and the 24 GB claim
               (CUDA, only where DALI is installed)

Memory, four views per training row (CUDA; on CPU only peak_mib, as RSS):
  peak_mib         torch.cuda.max_memory_allocated: tensors only
  reserved_mib     torch.cuda.max_memory_reserved: what torch's caching allocator took
  driver_before/after_mib  used device memory as the driver sees it (mem_get_info: total − free)
               before and after the row — CUDA context, cuDNN/cuBLAS/nvJPEG/DALI and any other
               process on the GPU included
  device_est_mib   reserved peak + (driver after − torch reserved after): the row's peak as
               the device had to hold it, non-torch memory taken at its after-row level

Data: ``--data memory`` (default) feeds random tensors (pinned on CUDA) so that the rows
measure the GPU, not the decoder; ``--data wds`` packs phantom shards into a temp dir and
runs the wds back end (PIL in DataLoader workers) — no DALI, no DeepSpeed on either path
(DALI is used only by the "dali memory" row, and only where it is installed).
Needs only torch, torchvision, timm, accelerate, safetensors, numpy, pandas, pyarrow, pillow
(+ pyyaml, tqdm, scikit-learn, which those pull in).

``--budget-s`` caps the whole run: a row whose time estimate does not fit in what is left
is skipped with a note, and the max-batch search stops at 1.5× its own estimate. The table
is printed and, with ``--out``, written as markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# cuBLAS needs this for train.deterministic=true on CUDA; it must be set before the first matmul
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.config import load_config  # noqa: E402
from cxr.train import EXIT_REQUEUE, train  # noqa: E402

COLUMNS = (
    "check",
    "model",
    "res",
    "batch",
    "ckpt",
    "compile",
    "value",
    "unit",
    "peak_mib",
    "reserved_mib",
    "driver_before_mib",
    "driver_after_mib",
    "device_est_mib",
    "seconds",
    "note",
)
A10G_MIB = 23028  # total memory nvidia-smi lists for an A10G ("24 GB"); from public listings, not measured here


@dataclass
class Row:
    check: str
    model: str = "-"
    res: int | str = "-"
    batch: int | str = "-"
    ckpt: str = "-"
    compile: str = "-"
    value: float = math.nan
    unit: str = ""
    peak_mib: float = math.nan
    reserved_mib: float = math.nan
    driver_before_mib: float = math.nan
    driver_after_mib: float = math.nan
    device_est_mib: float = math.nan
    seconds: float = math.nan
    note: str = ""


@dataclass
class Plan:
    """Sizes of one run (GPU defaults, or the tiny CPU smoke)."""

    device: str
    models: list[str]
    resolutions: list[int]
    batch: int
    warmup: int
    steps: int
    max_batch_cap: int
    jpeg_images: int
    jpeg_repeats: int
    resume_res: int
    compile_backend: str
    data: str
    workers: int
    budget_s: float
    estimates: dict = field(default_factory=dict)  # seconds a row of each check is expected to take
    nih_sample: Path | None = None
    png_seconds: float = 3.0
    extra: bool = False
    compile_note: str = ""


# ----------------------------------------------------------------------------- measurement helpers
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # a CPU-GPU sync point: only at the ends of a timed stretch


def reset_peak(device: str) -> None:
    if device == "cuda":  # free the last row's blocks so each row's peak is its own
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def driver_used_mib(device: str) -> float:
    """Device memory in use as the driver reports it (total − free), every allocator and process included."""
    if device != "cuda":
        return math.nan
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def device_estimate(reserved_peak: float, driver_after: float, reserved_after: float) -> tuple[float, float]:
    """(non-torch MiB, estimated device peak MiB) of a row, from torch's and the driver's views.

    non-torch = what the driver counts as used beyond torch's caching allocator after the row
    (CUDA context, libraries' own buffers, DALI, other processes); the peak the device had to
    hold is torch's reserved peak plus that. All in MiB; nan in, nan out.
    """
    other = driver_after - reserved_after
    return other, reserved_peak + other


def record_memory(row: Row, device: str, before: float) -> None:
    """Fill a row's four memory views (call right after the row's work, before anything is freed)."""
    row.peak_mib = peak_mib(device)
    if device != "cuda":
        return
    row.reserved_mib = torch.cuda.max_memory_reserved() / 2**20
    row.driver_before_mib, row.driver_after_mib = before, driver_used_mib(device)
    _, row.device_est_mib = device_estimate(
        row.reserved_mib, row.driver_after_mib, torch.cuda.memory_reserved() / 2**20
    )


def device_budget(ckpt_row: Row, dali_mib: float | None, capacity_mib: float = A10G_MIB) -> tuple[float, str]:
    """(estimated MiB on one training GPU, note) for the checkpoint row plus DALI's own memory.

    dali_mib: DALI's device memory for one pipeline (None: not measured); a run keeps its train
    and val pipelines, so it counts twice. The verdict compares with capacity_mib.
    """
    if ckpt_row is None or math.isnan(ckpt_row.device_est_mib):
        return math.nan, "no checkpoint-row device estimate (row skipped or failed)"
    dali = 0.0 if dali_mib is None or math.isnan(dali_mib) else 2 * dali_mib
    total = ckpt_row.device_est_mib + dali
    parts = (
        f"{ckpt_row.model} b{ckpt_row.batch} at {ckpt_row.res}², checkpointing: device est. "
        f"{ckpt_row.device_est_mib:.0f} MiB + DALI " + (f"2 × {dali_mib:.0f}" if dali else "not measured (0)")
    )
    verdict = "fits" if total <= capacity_mib else "does NOT fit"
    return total, (
        f"{parts} = {total:.0f} MiB; {verdict} {capacity_mib:.0f} MiB (A10G total) — measured on "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'this device'}, "
        "whose cuDNN algorithms and context size differ from an A10G's"
    )


class Clock:
    """Wall time from the request of train batch `warmup` to the end of the epoch."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.start, self.end = warmup, device, None, None

    def tick(self) -> None:
        sync(self.device)
        self.start = time.perf_counter()

    def tock(self) -> None:
        sync(self.device)
        self.end = time.perf_counter()


def memory_loader(plan: Plan, clock: Clock | None, stop_at: int | None = None):
    """A ``build_loader``-compatible factory over random tensors, identical for any (epoch, batch i).

    The train split has plan.warmup + plan.steps batches per epoch; val has one small batch.
    stop_at: send this process SIGUSR1 when train batch `stop_at` of epoch 0 is requested
    (the loop's stop flag then saves ``last`` and returns 75, as on a preemption)."""
    pin = plan.device == "cuda"

    class MemoryLoader:
        def __init__(self, cfg, split, rank=0, world_size=1, epoch=0, skip_batches=0, train=None):
            self.cfg, self.split, self.epoch, self.skip = cfg, split, epoch, skip_batches
            self.n = plan.warmup + plan.steps if split == "train" else 1

        def __len__(self):
            return self.n - self.skip

        def batch(self, i: int) -> dict:
            b = self.cfg.batch_size if self.split == "train" else min(self.cfg.batch_size, 4)
            r = self.cfg.resolution
            g = torch.Generator().manual_seed(1000 * self.epoch + i + (0 if self.split == "train" else 10**6))
            image = torch.rand(b, 1, r, r, generator=g).sub_(0.5).mul_(4.0)
            labels = (torch.rand(b, 14, generator=g) < 0.3).float()
            if pin:
                image, labels = image.pin_memory(), labels.pin_memory()
            return {
                "image": image,
                "labels": labels,
                "meta": torch.zeros(b, 5),
                "key": [f"{self.split}{i:04d}_{j:04d}" for j in range(b)],
            }

        def __iter__(self):
            cached = None
            for i in range(self.skip, self.n):
                if self.split == "train" and clock is not None and i == clock.warmup:
                    clock.tick()
                if self.split == "train" and stop_at is not None and self.epoch == 0 and i == stop_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
                # throughput rows reuse one batch (random generation would dominate at 1024²);
                # the resume row (clock None) needs every batch different
                if clock is None or cached is None:
                    cached = self.batch(i)
                yield cached
            if self.split == "train" and clock is not None:
                clock.tock()

        def report(self):
            return {"samples": 0, "skipped": 0, "skipped_keys": []}

    return MemoryLoader


class TimedLoader:
    """Wraps the real ``build_loader`` (wds back end) with the same clock as memory_loader."""

    def __init__(self, plan: Plan, clock: Clock):
        from cxr.data import build_loader

        self.build, self.plan, self.clock = build_loader, plan, clock

    def __call__(self, cfg, split, **kwargs):
        loader = self.build(cfg, split, **kwargs)
        clock, n = self.clock, self.plan.warmup + self.plan.steps

        class Timed:
            def __len__(self):
                return min(len(loader), n) if split == "train" else len(loader)

            def __iter__(self):
                for i, batch in enumerate(loader):
                    if split == "train" and i == clock.warmup:
                        clock.tick()
                    if split == "train" and i >= n:
                        break
                    yield batch
                if split == "train":
                    clock.tock()

            def report(self):
                return loader.report()

        return Timed()


def config(
    plan: Plan,
    run_dir: Path,
    model: str,
    res: int,
    batch: int,
    ckpt: bool = False,
    compile_: bool = False,
    extra: tuple[str, ...] = (),
):
    """The training config of one row: bf16 autocast, channels_last, one epoch, constant lr."""
    overrides = [
        f"model.name={model}",
        f"data.resolution={res}",
        f"data.batch_size={batch}",
        f"data.eval_batch_size={min(batch, 4)}",
        f"model.grad_checkpointing={str(ckpt).lower()}",
        "model.channels_last=true",
        f"train.compile={str(compile_).lower()}",
        "train.mixed_precision=bf16",
        "train.epochs=1",
        "schedule.name=constant",
        "optim.lr=1e-4",
        "train.early_stop_patience=0",
        "logging.progress=false",
        "logging.log_every=1000000",
        f"checkpoint.run_dir={run_dir}",
        "data.augment=false",
    ]
    if plan.data == "wds":
        overrides += [
            f"data.shards={plan.estimates['shards']}",
            "data.backend=wds",
            f"data.num_threads={plan.workers}",
            f"data.device={'gpu' if plan.device == 'cuda' else 'cpu'}",
        ]
    return load_config(None, overrides + list(extra))


def run_train(cfg, loader_fn) -> int:
    return train(cfg, loader_fn=loader_fn)


# ----------------------------------------------------------------------------- the checks
def throughput(plan: Plan, tmp: Path, model: str, res: int, batch: int, ckpt: bool, compile_: bool, check: str) -> Row:
    row = Row(
        check, model, res, batch, "on" if ckpt else "off", plan.compile_backend if compile_ else "off", unit="img/s"
    )
    run_dir = tmp / f"{check}-{model}-{res}-{int(ckpt)}{int(compile_)}"
    clock = Clock(plan.warmup, plan.device)
    loader_fn = TimedLoader(plan, clock) if plan.data == "wds" else memory_loader(plan, clock)
    if compile_:
        torch._dynamo.reset()
    reset_peak(plan.device)
    before = driver_used_mib(plan.device)
    t0 = time.perf_counter()
    status = run_train(config(plan, run_dir, model, res, batch, ckpt, compile_), loader_fn)
    row.seconds = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"train() exited {status}")
    row.value = plan.steps * batch / (clock.end - clock.start)
    record_memory(row, plan.device, before)
    row.note = f"{plan.steps} timed steps after {plan.warmup}; {plan.data} data"
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def fits(plan: Plan, tmp: Path, model: str, res: int, batch: int) -> tuple[bool, float]:
    """(two training steps at `batch` ran without running out of device memory, peak MiB)."""
    probe = Plan(**{**plan.__dict__, "warmup": 0, "steps": 2})
    run_dir = tmp / f"probe-{batch}"
    reset_peak(plan.device)
    ok = True
    try:
        run_train(config(probe, run_dir, model, res, batch), memory_loader(probe, None))
    except torch.cuda.OutOfMemoryError:
        ok = False  # the frames holding the failed step's tensors go with the exception
    except RuntimeError as err:  # cuDNN / cuBLAS report an allocation failure as a plain RuntimeError
        if "out of memory" not in str(err).lower() and "ALLOC_FAILED" not in str(err):
            raise
        ok = False
    peak = peak_mib(plan.device)
    shutil.rmtree(run_dir, ignore_errors=True)
    reset_peak(plan.device)
    return ok, peak


def max_batch(plan: Plan, tmp: Path, model: str, res: int, deadline: float) -> Row:
    """Largest micro-batch that trains: double from plan.batch until OOM or the cap, then bisect."""
    row = Row("max batch", model, res, ckpt="off", compile="off", unit="micro-batch")
    t0 = time.perf_counter()
    lo, hi, peak, probes = 0, None, math.nan, 0
    b = max(1, plan.batch)
    while hi is None and b <= plan.max_batch_cap and time.perf_counter() < deadline:
        ok, p = fits(plan, tmp, model, res, b)
        probes += 1
        if not ok:
            hi = b
            break
        lo, peak = b, p
        b = min(b * 2, plan.max_batch_cap) if b < plan.max_batch_cap else b + 1
    while hi is not None and hi - lo > max(1, lo // 16) and time.perf_counter() < deadline:
        mid = (lo + hi) // 2
        ok, p = fits(plan, tmp, model, res, mid)
        probes += 1
        if ok:
            lo, peak = mid, p
        else:
            hi = mid
    row.seconds = time.perf_counter() - t0
    row.value, row.batch, row.peak_mib = float(lo), lo, peak
    if lo == 0:
        row.value = math.nan
        row.note = f"batch {plan.batch} does not fit"
    elif hi is None:
        row.note = f"≥ {lo}: --max-batch-cap reached ({probes} probes)"
    elif hi - lo > max(1, lo // 16):
        row.note = f"{lo} fits, {hi} does not; section budget ran out ({probes} probes)"
    else:
        row.note = f"{lo} fits, {hi} runs out of memory ({probes} probes; bf16, channels_last, no checkpointing)"
    return row


def resume_exact(plan: Plan, tmp: Path, model: str) -> Row:
    """Run A straight; run B signalled mid-epoch 0, then resumed: final weights bitwise equal?"""
    from safetensors.torch import load_file

    row = Row("resume", model, plan.resume_res, plan.batch, "off", "off", unit="1 = bitwise equal")
    res_plan = Plan(**{**plan.__dict__, "data": "memory"})
    extra = ("train.deterministic=true", "train.epochs=2", "data.augment=false")
    reset_peak(plan.device)
    t0 = time.perf_counter()
    a, b = tmp / "resume-a", tmp / "resume-b"
    status_a = run_train(
        config(res_plan, a, model, plan.resume_res, plan.batch, extra=extra), memory_loader(res_plan, None)
    )
    stop_at = max(1, (plan.warmup + plan.steps) // 2)
    status_b1 = run_train(
        config(res_plan, b, model, plan.resume_res, plan.batch, extra=extra),
        memory_loader(res_plan, None, stop_at=stop_at),
    )
    status_b2 = run_train(
        config(res_plan, b, model, plan.resume_res, plan.batch, extra=extra), memory_loader(res_plan, None)
    )
    row.seconds, row.peak_mib = time.perf_counter() - t0, peak_mib(plan.device)
    if (status_a, status_b1, status_b2) != (0, EXIT_REQUEUE, 0):
        raise RuntimeError(f"exit statuses A {status_a}, B {status_b1} then {status_b2} (want 0, 75, 0)")
    wa = load_file(str(a / "checkpoints" / "last" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "last" / "model.safetensors"))
    differ = [k for k in wa if k not in wb or not torch.equal(wa[k], wb[k])]
    row.value = float(not differ and wa.keys() == wb.keys())
    row.note = f"2 epochs × {plan.warmup + plan.steps} steps, stopped at step {stop_at + 1} of epoch 1; " + (
        f"{len(wa)} tensors equal" if not differ else f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    )
    shutil.rmtree(a, ignore_errors=True)
    shutil.rmtree(b, ignore_errors=True)
    return row


def jpeg_files(n: int, res: int) -> list[bytes]:
    """n phantom chest X-rays (shards.synth) at res², JPEG quality 95 as the NIH-like grey L8."""
    from PIL import Image

    from shards.synth import LabelSampler, plan_cases, render

    out = []
    for case in plan_cases(n, 0, LabelSampler(None)):
        buf = io.BytesIO()
        Image.fromarray(render(case, 0, res), mode="L").save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def jpeg_decode(plan: Plan, res: int) -> Row:
    """torchvision.io.decode_jpeg on a batch of encoded images (nvJPEG on CUDA); images/s."""
    from torchvision.io import ImageReadMode, decode_jpeg

    row = Row("jpeg decode", "-", res, plan.jpeg_images, unit="img/s")
    t0 = time.perf_counter()
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpeg_files(plan.jpeg_images, res)]
    decoded = decode_jpeg(data, mode=ImageReadMode.GRAY, device=plan.device)  # warm-up (nvJPEG handles)
    if tuple(decoded[0].shape) != (1, res, res):
        raise RuntimeError(f"decoded shape {tuple(decoded[0].shape)}, want (1, {res}, {res})")
    reset_peak(plan.device)
    before = driver_used_mib(plan.device)
    sync(plan.device)
    start = time.perf_counter()
    for _ in range(plan.jpeg_repeats):
        decode_jpeg(data, mode=ImageReadMode.GRAY, device=plan.device)
    sync(plan.device)
    row.value = plan.jpeg_repeats * len(data) / (time.perf_counter() - start)
    record_memory(row, plan.device, before)
    row.seconds = time.perf_counter() - t0
    row.note = (
        f"decode_jpeg(device={plan.device!r}), batches of {len(data)}, {plan.jpeg_repeats} repeats, "
        f"{np.mean([len(b) for b in data]) / 1024:.0f} kB/image (phantoms, q95)"
    )
    return row


def dali_memory(plan: Plan, tmp: Path, res: int) -> Row:
    """DALI's own device memory: driver-used delta minus torch's reserved delta around a mixed pipeline.

    The loader's own DALI path (data.backend=dali, data.device=gpu, augmentation on) over JPEG
    phantom shards, so nvJPEG decodes; measured while the pipeline is alive, after a few batches.
    """
    import importlib.util

    row = Row("dali memory", "-", res, plan.batch, unit="MiB (DALI's own)")
    if importlib.util.find_spec("nvidia.dali") is None:
        row.note = (
            "skipped: DALI not installed here — DALI's device memory is in none of these numbers "
            "(install nvidia-dali-cuda1xx and rerun to measure it)"
        )
        return row
    from cxr.data import DataConfig, build_loader

    t0 = time.perf_counter()
    shards = make_shards(plan, tmp / "dali", codec="jpeg", res=res, batches=4)
    reset_peak(plan.device)
    before, reserved_before = driver_used_mib(plan.device), torch.cuda.memory_reserved() / 2**20
    cfg = DataConfig(
        shards=str(shards),
        backend="dali",
        device="gpu",
        resolution=res,
        batch_size=plan.batch,
        num_threads=4,
        augment=True,
    )
    loader, n = build_loader(cfg, "train"), 0
    for batch in loader:  # measured inside the loop: an epoch left early drops its pipeline
        n += 1
        if n == min(4, len(loader)):
            sync(plan.device)
            record_memory(row, plan.device, before)
            reserved_after = torch.cuda.memory_reserved() / 2**20
            row.value = (row.driver_after_mib - before) - (reserved_after - reserved_before)
            break
    row.seconds = time.perf_counter() - t0
    row.note = (
        f"{n} batches of {plan.batch} at {res}² (JPEG q95 phantoms, nvJPEG, augmentation on the GPU); "
        "value = driver-used delta − torch reserved delta (torch holds the output batches)"
    )
    return row


# ----------------------------------------------------------------------------- orchestration
def rows_to_run(plan: Plan):
    """(check, estimated seconds, section, args) in run order: the most valuable first, so that a
    short budget drops the least; the resume row (deterministic numerics) after every timed row
    but the optional ones (train() resets the numerics at each start anyway)."""
    big = max(plan.resolutions)
    others = [r for r in plan.resolutions if r != big]
    items = []
    for model in plan.models:
        for res in plan.resolutions:
            items.append(("throughput", plan.estimates["throughput"], "throughput", (model, res, False, False)))
            items.append(("checkpoint", plan.estimates["throughput"], "throughput", (model, res, True, False)))
    for model in plan.models:
        for ckpt in (False, True):
            items.append(("compile", plan.estimates["compile"], "compile", (model, big, ckpt, True)))
    items.append(("probe", plan.estimates["probe"], "probe", (plan.models[0], big)))
    items.append(("png decode", plan.estimates["png decode"], "png decode", (1024,)))
    items.append(("resume", plan.estimates["resume"], "resume", (plan.models[0],)))
    for model in plan.models:
        for res in others:
            for ckpt in (False, True):
                items.append(("compile", plan.estimates["compile"], "compile", (model, res, ckpt, True)))
    if plan.extra:  # --extra: the older rows (largest batch, JPEG on the GPU, DALI's memory)
        items.append(("max batch", plan.estimates["max batch"], "max batch", (plan.models[0], big)))
        items.append(("jpeg decode", plan.estimates["jpeg decode"], "jpeg decode", (big,)))
        if plan.device == "cuda":  # device memory beyond torch's allocator exists only there
            items.append(("dali memory", plan.estimates["dali memory"], "dali memory", (big,)))
            items.append(("24 GB claim", 0, "24 GB claim", (plan.models[0], big)))
    return items


def estimated_seconds(plan: Plan) -> float:
    """The run's own estimate: the rows' estimates that fit the budget, in order (as run_all skips)."""
    total = 0.0
    for _check, estimate, _section, _args in rows_to_run(plan):
        if total + estimate <= plan.budget_s:
            total += estimate
    return total


def compile_backend(requested: str) -> tuple[str, str]:
    """(backend to use, note): inductor needs a C compiler (Triton builds its launcher with one, the
    CPU wrapper is C++); without one the rows use aot_eager — the graph is captured and partitioned
    (checkpointing, BatchNorm) but not fused, so its img/s says nothing about inductor's."""
    if requested != "inductor":
        return requested, ""
    if os.environ.get("CC") or any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        return requested, ""
    return "aot_eager", "no C compiler on this machine: aot_eager instead of inductor (no fused kernels)"


def nih_sample(path: Path | None) -> Path | None:
    """The real NIH sample PNGs: --nih-sample, $CXR_NIH/sample, or shared/data/nih/sample here or one level up."""
    candidates = [path] if path else []
    if os.environ.get("CXR_NIH"):
        candidates.append(Path(os.environ["CXR_NIH"]) / "sample")
    candidates += [ROOT / "shared" / "data" / "nih" / "sample", ROOT.parent / "shared" / "data" / "nih" / "sample"]
    return next((c for c in candidates if c and c.is_dir() and any(c.glob("*.png"))), None)


def png_decode(plan: Plan, res: int) -> Row:
    """PIL decode of the real NIH PNGs, in this process on one core: images/s per core (PNG never
    decodes on the GPU, so this sets how many CPU threads per GPU a PNG loader needs)."""
    from PIL import Image

    row = Row("png decode", res=res, unit="img/s per core")
    sample = nih_sample(plan.nih_sample)
    if sample is None:
        row.note = "skipped: no NIH sample PNGs (--nih-sample DIR, or $CXR_NIH/sample)"
        return row
    blobs = [f.read_bytes() for f in sorted(sample.glob("*.png"))]
    t0 = time.perf_counter()
    done = 0
    while done < len(blobs) or time.perf_counter() - t0 < plan.png_seconds:
        with Image.open(io.BytesIO(blobs[done % len(blobs)])) as im:
            im.convert("L").load()
        done += 1
    row.seconds = time.perf_counter() - t0
    row.value = done / row.seconds
    sizes = {Image.open(io.BytesIO(b)).size for b in blobs[:10]}
    row.note = (
        f"{len(blobs)} real NIH PNGs ({sum(map(len, blobs)) / len(blobs) / 1e3:.0f} kB mean, e.g. "
        f"{sorted(sizes)[0]}), PIL, {done} decodes; a GPU consuming N img/s needs N / {row.value:.0f} "
        f"decoder threads"
    )
    return row


def probe_vs_peak(plan: Plan, model: str, res: int, rows: list[Row]) -> Row:
    """cxr.training.probe's choice at this resolution (the effective batch = --batch) and its predicted peak,
    against the training row measured at the same layout (device estimate: reserved peak + memory
    outside torch) or, without one, the probe's own confirming step."""
    from cxr.training.probe import choose

    reset_peak(plan.device)
    t0 = time.perf_counter()
    got = choose(
        None,
        [f"model.name={model}", "model.channels_last=true", "train.mixed_precision=bf16"],
        res,
        plan.batch,
        device=plan.device,
    )
    ckpt = "on" if got.grad_checkpointing else "off"
    row = Row("probe", model, res, got.micro_batch, ckpt, "off", unit="measured / predicted")
    row.seconds = time.perf_counter() - t0
    same = next(
        (
            r
            for r in rows
            if r.check in ("throughput", "checkpoint")
            and r.model == model
            and r.res == res
            and r.batch == got.micro_batch
            and r.ckpt == ckpt
            and not math.isnan(r.value)
        ),
        None,
    )
    measured, source = math.nan, "no measurement at this layout"
    if same is not None and not math.isnan(same.device_est_mib):
        measured, source = same.device_est_mib, f"the {same.check} row's device estimate"
    elif got.confirmed_mb is not None:
        measured, source = got.confirmed_mb, "the probe's confirming step"
    elif same is not None:
        measured, source = same.peak_mib, f"the {same.check} row's peak RSS"
    row.value = measured / got.peak_mb if got.peak_mb else math.nan
    row.device_est_mib = measured
    row.note = (
        f"predicted {got.peak_mb:.0f} MiB (overhead {got.overhead_mb:.0f}) vs {measured:.0f} from {source}; "
        f"{got.reason}"
    )
    return row


def run_all(plan: Plan, tmp: Path) -> list[Row]:
    start = time.perf_counter()
    rows = []
    for check, estimate, _section, args in rows_to_run(plan):
        left = plan.budget_s - (time.perf_counter() - start)
        label = dict(zip(("model", "res", "ckpt", "compile"), args)) if len(args) > 1 else {"arg": args[0]}
        if estimate > left:
            rows.append(
                skipped_row(
                    plan, check, args, f"skipped: needs ~{estimate:.0f} s, {max(left, 0):.0f} s of --budget-s left"
                )
            )
            continue
        print(f"[gpu_check] {check} {label} ({left:.0f} s of budget left)", file=sys.stderr, flush=True)
        try:
            if check in ("throughput", "checkpoint", "compile"):
                model, res, ckpt, compile_ = args
                rows.append(throughput(plan, tmp, model, res, plan.batch, ckpt, compile_, check))
            elif check == "max batch":
                deadline = time.perf_counter() + min(left, estimate * 1.5)
                rows.append(max_batch(plan, tmp, *args, deadline=deadline))
            elif check == "resume":
                rows.append(resume_exact(plan, tmp, *args))
            elif check == "probe":
                rows.append(probe_vs_peak(plan, *args, rows=rows))
            elif check == "png decode":
                rows.append(png_decode(plan, *args))
            elif check == "dali memory":
                rows.append(dali_memory(plan, tmp, *args))
            elif check == "24 GB claim":
                ckpt = next((r for r in rows if r.check == "checkpoint" and r.model == args[0]), None)
                dali = next((r.value for r in rows if r.check == "dali memory"), None)
                row = Row(check, args[0], args[1], ckpt.batch if ckpt else "-", "on", "off", unit="MiB on one GPU")
                row.value, row.note = device_budget(ckpt, dali)
                rows.append(row)
            else:
                rows.append(jpeg_decode(plan, *args))
        except Exception as err:  # one failed row must not cost the others; the note says what broke
            rows.append(
                skipped_row(
                    plan,
                    check,
                    args,
                    f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    if str(err)
                    else f"FAILED: {type(err).__name__}",
                )
            )
        reset_peak(plan.device)
    return rows


def skipped_row(plan: Plan, check: str, args: tuple, note: str) -> Row:
    if check in ("jpeg decode", "dali memory", "png decode"):
        return Row(check, res=args[0], note=note)
    if check == "probe":
        return Row(check, args[0], args[1], note=note)
    if check == "24 GB claim":
        return Row(check, args[0], args[1], note=note)
    if check == "max batch":
        return Row(check, args[0], args[1], note=note)
    if check == "resume":
        return Row(check, args[0], plan.resume_res, note=note)
    model, res, ckpt, compile_ = args
    return Row(
        check, model, res, ckpt="on" if ckpt else "off", compile=plan.compile_backend if compile_ else "off", note=note
    )


def environment(plan: Plan) -> str:
    import accelerate
    import timm
    import torchvision

    dev = torch.cuda.get_device_name(0) if plan.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    cuda = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if plan.device == "cuda" else ""
    return (
        f"{dev}; torch {torch.__version__}{cuda}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"accelerate {accelerate.__version__}; bf16 autocast, channels_last; data {plan.data}"
    )


def markdown(rows: list[Row], header: str) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}")
        return str(v).replace("|", "/")

    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(getattr(r, c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def make_shards(plan: Plan, tmp: Path, codec: str = "png", res: int | None = None, batches: int | None = None) -> Path:
    """Phantom shards for --data wds (the real CLI: synth → split → pack) at the largest resolution."""
    n = max(64, int((batches or plan.warmup + plan.steps) * plan.batch / 0.7) + 16)
    py = [sys.executable, "-m", "shards"]
    res = res or max(plan.resolutions)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (
        [
            "synth",
            "--out",
            tmp / "synth",
            "--n",
            str(n),
            "--resolution",
            str(res),
            "--seed",
            "0",
            "--workers",
            str(plan.workers or 1),
        ],
        [
            "split",
            "--metadata",
            tmp / "synth" / "Data_Entry_2017.csv",
            "--scheme",
            "stratified",
            "--fractions",
            "0.7,0.15,0.15",
            "--out",
            tmp / "splits.parquet",
        ],
        [
            "pack",
            "--splits",
            tmp / "splits.parquet",
            "--images",
            tmp / "synth" / "images",
            "--out",
            tmp / "shards",
            "--workers",
            str(plan.workers or 1),
            "--codec",
            codec,
        ],
    ):
        subprocess.run(py + [str(a) for a in args], check=True, cwd=ROOT, capture_output=True, env=env)
    return tmp / "shards"


def build_plan(args) -> Plan:
    cpu = args.device == "cpu"
    default = dict(
        models=["densenet121"],
        resolutions=[32, 64] if cpu else [512, 1024],
        batch=2 if cpu else 16,
        warmup=1 if cpu else 3,
        steps=2 if cpu else 10,
        max_batch_cap=4 if cpu else 1024,
        jpeg_images=8 if cpu else 64,
        jpeg_repeats=2 if cpu else 5,
        resume_res=32 if cpu else 224,
        compile_backend="aot_eager" if cpu else "inductor",
    )
    # seconds per row on an H200 (CPU smoke: on 2 shared cores); compile rows include the compilation
    # (guesses from the step times of DenseNet-121 on smaller GPUs scaled to an H200's bf16 rate, and
    # Inductor's compile time of a 121-layer graph on 16 cores; not yet measured on an H200)
    estimates = (
        {
            "throughput": 5,
            "max batch": 30,
            "resume": 20,
            "jpeg decode": 5,
            "compile": 40,
            "dali memory": 0,
            "probe": 40,
            "png decode": 2,
        }
        if cpu
        else {
            "throughput": 15,
            "max batch": 90,
            "resume": 30,
            "jpeg decode": 15,
            "compile": 75,
            "dali memory": 40,
            "probe": 30,
            "png decode": 5,
        }
    )
    for key in default:
        value = getattr(args, key, None)
        if value is not None:
            default[key] = value
    backend, note = compile_backend(default["compile_backend"])
    default["compile_backend"] = backend
    return Plan(
        device=args.device,
        data=args.data,
        workers=args.workers,
        budget_s=args.budget_s,
        estimates=estimates,
        nih_sample=args.nih_sample,
        png_seconds=1.0 if cpu else 3.0,
        extra=args.extra,
        compile_note=note,
        **default,
    )


def patch_compile_backend(backend: str) -> None:
    """Make every torch.compile in the loop use `backend` (the CPU smoke uses "aot_eager": AOTAutograd, as inductor, without its C++ build)."""
    if backend == "inductor":
        return
    original = torch.compile

    def compile_with(model=None, **kwargs):
        kwargs["backend"] = backend
        return original(model, **kwargs) if model is not None else original(**kwargs)

    torch.compile = compile_with


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default): the real check; cpu: a tiny smoke of every row (32/64 px, 2 steps)",
    )
    p.add_argument("--out", type=Path, help="also write the table as markdown to this file")
    p.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help="total time budget; rows that would not fit are skipped with a note (default 360)",
    )
    p.add_argument(
        "--nih-sample",
        type=Path,
        default=None,
        help="folder of real NIH PNGs for the decode row (default $CXR_NIH/sample or shared/data/nih/sample)",
    )
    p.add_argument(
        "--extra",
        action="store_true",
        help="also the max-batch, JPEG-on-GPU and DALI-memory rows (not in the 6-minute default)",
    )
    p.add_argument(
        "--data",
        choices=("memory", "wds"),
        default="memory",
        help="memory: random tensors (default); wds: phantom shards through the wds back end",
    )
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="wds DataLoader workers")
    p.add_argument("--models", type=lambda s: s.split(","), help="comma list (default densenet121)")
    p.add_argument(
        "--resolutions", type=lambda s: [int(x) for x in s.split(",")], help="comma list (default 512,1024; cpu 32,64)"
    )
    p.add_argument("--batch", type=int, help="micro-batch of the throughput rows (default 16; cpu 2)")
    p.add_argument("--steps", type=int, help="timed steps per row (default 10; cpu 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; cpu 1)")
    p.add_argument("--max-batch-cap", type=int, help="largest micro-batch probed (default 1024; cpu 4)")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; cpu eager)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device visible — run on a GPU machine, or use --device cpu", file=sys.stderr)
        return 2
    plan = build_plan(args)
    patch_compile_backend(plan.compile_backend)
    if plan.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    print(
        f"gpu_check: estimated {estimated_seconds(plan):.0f} s of --budget-s {plan.budget_s:.0f}"
        + (f"; {plan.compile_note}" if plan.compile_note else ""),
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        if plan.data == "wds":
            plan.estimates["shards"] = make_shards(plan, Path(tmp))
        with contextlib.redirect_stdout(sys.stderr):
            rows = run_all(plan, Path(tmp))
    elapsed = time.perf_counter() - t0
    header = (
        f"gpu_check: {environment(plan)}; {elapsed:.0f} s (own estimate {estimated_seconds(plan):.0f} s, "
        f"budget {plan.budget_s:.0f} s){'; ' + plan.compile_note if plan.compile_note else ''}\n\n"
        f"`python bench/gpu_check.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
    )
    text = markdown(rows, header)
    print(text)
    if args.out:
        from cxrbase.atomic import atomic_write_text

        atomic_write_text(args.out, text)
    failed = [r for r in rows if r.note.startswith("FAILED")]
    skipped = [r for r in rows if r.note.startswith("skipped")]
    print(
        f"gpu_check: {len(rows)} rows, {len(failed)} failed, {len(skipped)} skipped, {elapsed:.0f} s", file=sys.stderr
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
