"""Memory probe: the micro-batch × accumulation that fits a resolution on this device.

    python -m cxr.training.probe --config cxr/configs/densenet121.yaml --resolution 1024 --effective-batch 16
    python -m cxr.training.probe --config C --resolution 1024 --capacity-mb 23028 --method model   # an A10G, no GPU needed
    python -m cxr.training.probe --config C --resolution 512 --measure 4      # one measurement, prints MB

A sweep keeps the effective batch (micro-batch × accumulation) and the schedule equal
across resolutions; only the micro-batch changes, chosen here. BatchNorm normalises over
the micro-batch, so the probe prefers the LARGEST micro-batch up to the effective batch,
with activation checkpointing where that is what makes it fit (at equal micro-batch,
without checkpointing, which is faster): a smaller micro-batch would silently change the
BatchNorm statistics the runs of a sweep are compared under.

The memory curve peak(b) = base + b · per_sample (weights, gradients, optimizer state fixed;
activations per sample) comes from two steps (forward + backward + Adam) of the REAL model
(built from the config) at b = 1 and b = 2, with and without checkpointing, under the
training numerics — the config's autocast (``train.mixed_precision``; ``auto``: the
launcher's), ``model.channels_last`` and, on CUDA, ``train.cudnn_benchmark`` — by one of:

  measure (default)  CUDA: ``torch.cuda.max_memory_reserved`` (what the caching allocator
                     holds, fragmentation included); CPU: peak RSS of a fresh subprocess
  model              any device, no GPU: the live tensor bytes of a CPU step (a dispatch-mode
                     tracker, in this process) at a small resolution, the per-sample part scaled
                     by the pixel count (a convolutional trunk's activations grow with H·W)

To the curve it adds ``overhead_mb``, the device memory outside torch's allocator: the
CUDA context, cuDNN/cuBLAS workspaces (measured on CUDA as the driver's used memory minus
torch's reserved), NCCL's buffers and the DALI decoder's pool (``--overhead-mb``,
default 1536 MB on CUDA or when modelling a GPU, 0 on CPU; bench/gpu_check.py measures it). On CUDA the choice is
confirmed by one real step at the chosen layout; if that does not fit, the next layout
is tried. RUN/probe.json (and the job's log) say what was chosen and why.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# a step's memory is measured by cxr.training.memory; this module chooses the layout and owns probe.json
from cxr.training.memory import (
    device_budget_mb,
    free_cuda,
    non_torch_mb,
    precision_name,
    step_peak_mb,
    training_numerics,
)
from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError, cli_entry

PROBE_FILE = "probe.json"  # RUN/probe.json: this module writes and reads it
CUDA_OVERHEAD_MB = 1536.0
"""Default non-torch device memory per process on CUDA: context + cuDNN/cuBLAS (~0.5–1 GB),
NCCL buffers and the DALI/nvImageCodec pool (16 MiB device per decoder thread + its
pipelines' buffers). bench/gpu_check.py measures the first; docs/cluster.md."""
MODEL_RESOLUTION = 128
"""The resolution at which ``method=model`` runs its CPU step (then scales per sample)."""


@dataclass
class ProbeResult:
    """The chosen layout and what it was chosen from (written to RUN/probe.json)."""

    resolution: int
    device: str
    effective_batch: int
    micro_batch: int
    grad_accum: int
    grad_checkpointing: bool
    budget_mb: float
    base_mb: float
    per_sample_mb: float
    peak_mb: float
    """Predicted peak at the chosen micro-batch, non-torch overhead included."""
    measured_mb: dict
    overhead_mb: float = 0.0
    method: str = "measure"
    numerics: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    """"checkpointing=false|true" → {"base_mb", "per_sample_mb"}."""
    confirmed_mb: float | None = None
    """One real step at the chosen layout (+ overhead); None where not confirmed (model, CPU)."""
    config_micro_batch: int | None = None
    config_grad_checkpointing: bool | None = None
    reason: str = ""

    def overrides(self) -> list[str]:
        """The training overrides this layout means."""
        return [
            f"data.batch_size={self.micro_batch}",
            f"train.grad_accum_steps={self.grad_accum}",
            f"model.grad_checkpointing={str(self.grad_checkpointing).lower()}",
        ]

    def differs_from_config(self) -> str | None:
        """A sentence when the chosen micro-batch or checkpointing is not the config's, else None."""
        parts = []
        if self.config_micro_batch is not None and self.micro_batch != self.config_micro_batch:
            parts.append(
                f"micro-batch {self.micro_batch} (config {self.config_micro_batch}: BatchNorm sees "
                f"{self.micro_batch} images per step instead)"
            )
        if self.config_grad_checkpointing is not None and self.grad_checkpointing != self.config_grad_checkpointing:
            parts.append(
                f"checkpointing {str(self.grad_checkpointing).lower()} "
                f"(config {str(self.config_grad_checkpointing).lower()})"
            )
        return "; ".join(parts) or None


def write_probe(run_dir: str | Path, result: ProbeResult) -> Path:
    """Write ``RUN/probe.json`` atomically; returns its path."""
    path = Path(run_dir) / PROBE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(result), indent=2) + "\n")
    return path


def read_probe(run_dir: str | Path) -> ProbeResult | None:
    """``RUN/probe.json`` as written by :func:`write_probe`, or None when the run has none."""
    path = Path(run_dir) / PROBE_FILE
    if not path.is_file():
        return None
    try:
        return ProbeResult(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise CxrError(f"{path}: unreadable memory probe ({err}) — delete it and the probe runs again") from None


def measure(
    config: str | None, overrides: Sequence[str], resolution: int, batch: int, device: str, method: str = "measure"
) -> float:
    """Peak MB of a step at ``batch``: in this process on CUDA (the allocator's peak, reset per step) and
    with ``method="model"`` (the live tensor bytes made inside the tracker, on the CPU; the caller's random
    streams untouched), in a fresh subprocess for the peak RSS of a CPU step."""
    if device.startswith("cuda") and method == "measure":
        return step_peak_mb(config, overrides, resolution, batch, device)
    if method == "model":
        import torch

        with torch.random.fork_rng(devices=[]):  # to 0.1 MB, as the subprocess prints it
            return float(f"{step_peak_mb(config, overrides, resolution, batch, 'cpu', track=True):.1f}")
    argv = [
        sys.executable,
        "-m",
        "cxr.training.probe",
        "--resolution",
        str(resolution),
        "--measure",
        str(batch),
        "--device",
        device,
        *(["--config", config] if config else []),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise CxrError(
            f"{config}: memory probe at {resolution} px, batch {batch} failed "
            f"({(done.stderr.strip().splitlines() or ['?'])[-1]}) — run it alone: {' '.join(argv)}"
        )
    return float(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the choice
@dataclass
class Layout:
    micro_batch: int
    checkpointing: bool
    predicted_mb: float


def candidates(
    curves: dict[bool, tuple[float, float]], effective_batch: int, budget_mb: float, overhead_mb: float
) -> list[Layout]:
    """Layouts that fit, best first: micro-batches dividing ``effective_batch``, largest first; at
    each, without checkpointing when that fits, else with. ``curves``: checkpointing → (base, per sample)."""
    out = []
    for b in range(effective_batch, 0, -1):
        if effective_batch % b:
            continue
        for ckpt in (False, True):
            if ckpt not in curves:
                continue
            base, per = curves[ckpt]
            predicted = base + b * per + overhead_mb
            if predicted <= budget_mb:
                out.append(Layout(b, ckpt, predicted))
                break
    return out


def explain(
    chosen: Layout, curves: dict[bool, tuple[float, float]], effective_batch: int, budget_mb: float, overhead_mb: float
) -> str:
    """Why ``chosen``: one sentence naming the alternative it beat."""
    b = chosen.micro_batch
    plain = curves[False][0] + b * curves[False][1] + overhead_mb if False in curves else float("nan")
    head = (
        f"micro-batch {b} × accumulation {effective_batch // b}"
        f"{' = the effective batch' if b == effective_batch else ''}, checkpointing "
        f"{str(chosen.checkpointing).lower()}: predicted {chosen.predicted_mb:.0f} MB of {budget_mb:.0f} MB "
        f"(incl. {overhead_mb:.0f} MB outside torch)"
    )
    if chosen.checkpointing:
        return head + f"; without checkpointing micro-batch {b} needs {plain:.0f} MB"
    if b < effective_batch:
        return head + "; a larger micro-batch does not fit even with checkpointing"
    return head


def choose(
    config: str | None,
    overrides: Sequence[str],
    resolution: int,
    effective_batch: int,
    device: str | None = None,
    fraction: float = 0.9,
    budget_mb: float | None = None,
    overhead_mb: float | None = None,
    method: str = "measure",
    confirm: bool = True,
    capacity_mb: float | None = None,
) -> ProbeResult:
    """Measure (or model) the memory curve with and without checkpointing and pick the largest
    micro-batch dividing ``effective_batch`` that fits; on CUDA confirm it with one real step.

    Budget: ``budget_mb``, else ``fraction`` × ``capacity_mb`` (a target GPU's total memory, for
    ``method="model"`` on a machine without it), else ``fraction`` of this device's memory.
    ``overhead_mb`` defaults to :data:`CUDA_OVERHEAD_MB` on CUDA or when modelling a GPU
    (``capacity_mb``), else 0."""
    from cxr.config import load_config

    if method not in ("measure", "model"):
        raise CxrError(f"--method {method}: use measure or model")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(config, [*overrides, f"data.resolution={resolution}"])
    numerics = training_numerics(cfg, device)
    if budget_mb is not None:
        budget = budget_mb
    elif capacity_mb is not None:
        budget = fraction * capacity_mb
    else:
        budget = device_budget_mb(device, fraction)
    gpu_target = device.startswith("cuda") or capacity_mb is not None
    curves, measured = _curves(config, overrides, resolution, device, method, numerics)
    extra_non_torch = 0.0
    if device.startswith("cuda") and method == "measure":
        extra_non_torch = non_torch_mb(device)  # context + cuDNN/cuBLAS handles, now that they exist
    overhead = overhead_mb if overhead_mb is not None else (CUDA_OVERHEAD_MB if gpu_target else 0.0)
    overhead = max(overhead, extra_non_torch)
    confirmed = None
    for layout in candidates(curves, effective_batch, budget, overhead):
        if confirm and device.startswith("cuda") and method == "measure":
            confirmed = _confirm(config, overrides, resolution, layout, device, overhead)
            if confirmed > budget:
                continue
        base, per = curves[layout.checkpointing]
        b = layout.micro_batch
        return ProbeResult(
            resolution,
            device,
            effective_batch,
            b,
            effective_batch // b,
            layout.checkpointing,
            round(budget, 1),
            round(base, 1),
            round(per, 2),
            round(layout.predicted_mb, 1),
            measured,
            overhead_mb=round(overhead, 1),
            method=method,
            numerics=numerics,
            curves={
                f"checkpointing={str(k).lower()}": {"base_mb": round(v[0], 1), "per_sample_mb": round(v[1], 2)}
                for k, v in curves.items()
            },
            confirmed_mb=None if confirmed is None else round(confirmed, 1),
            config_micro_batch=cfg.data.batch_size,
            config_grad_checkpointing=cfg.model.grad_checkpointing,
            reason=explain(layout, curves, effective_batch, budget, overhead),
        )
    base, per = curves[True]
    raise CxrError(
        f"{config}: even micro-batch 1 with activation checkpointing needs ~{base + per + overhead:.0f} MB "
        f"at {resolution} px but the budget is {budget:.0f} MB — lower the resolution or use a larger device"
    )


def _curves(
    config: str | None, overrides: Sequence[str], resolution: int, device: str, method: str, numerics: dict
) -> tuple[dict[bool, tuple[float, float]], dict[str, float]]:
    """choose's memory curves {checkpointing: (base, per_sample)} at ``resolution`` from steps at
    b = 1 and 2 (``method="model"``: at MODEL_RESOLUTION, the per-sample part scaled by the pixel
    count), and the measured peaks by name."""
    measured: dict[str, float] = {}
    curves: dict[bool, tuple[float, float]] = {}
    at = min(resolution, MODEL_RESOLUTION) if method == "model" else resolution
    scale = (resolution / at) ** 2
    for ckpt in (False, True):
        extra = [*overrides, f"model.grad_checkpointing={str(ckpt).lower()}"]
        if method == "model":
            extra.append(f"train.mixed_precision={precision_name(numerics['autocast'])}")
        peaks = {b: measure(config, extra, at, b, device, method) for b in (1, 2)}
        per_sample = max(peaks[2] - peaks[1], 1e-3)
        curves[ckpt] = (peaks[1] - per_sample, per_sample * scale)
        measured.update({f"checkpointing={str(ckpt).lower()},b={b}": round(v, 1) for b, v in peaks.items()})
    return curves, measured


def _confirm(
    config: str | None, overrides: Sequence[str], resolution: int, layout: Layout, device: str, overhead: float
) -> float:
    """One real step at ``layout`` on CUDA: its peak + overhead MB, or inf when it runs out of memory."""
    extra = [*overrides, f"model.grad_checkpointing={str(layout.checkpointing).lower()}"]
    try:
        return measure(config, extra, resolution, layout.micro_batch, device) + overhead
    except Exception as err:  # torch.cuda.OutOfMemoryError: the next layout
        if "out of memory" not in str(err).lower():
            raise
        free_cuda()
        return float("inf")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cxr.training.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="training config (YAML)")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument(
        "--effective-batch",
        type=int,
        default=None,
        help="micro-batch × accumulation to keep (default: the config's batch × accumulation)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--fraction", type=float, default=0.9, help="share of the device memory to fill (default 0.9)")
    p.add_argument("--budget-mb", type=float, default=None, help="memory budget in MB instead of --fraction")
    p.add_argument(
        "--capacity-mb",
        type=float,
        default=None,
        help="a target GPU's total memory (with --method model): budget = fraction × this; "
        "an A10G ('24 GB') lists 23028",
    )
    p.add_argument(
        "--overhead-mb",
        type=float,
        default=None,
        help=f"device memory outside torch per process (default {CUDA_OVERHEAD_MB:.0f} on CUDA, 0 on CPU)",
    )
    p.add_argument(
        "--method",
        choices=("measure", "model"),
        default="measure",
        help="measure on this device, or model from a CPU step (no GPU needed)",
    )
    p.add_argument(
        "--measure",
        type=int,
        default=None,
        metavar="B",
        help="only measure one step at batch B in this process and print the peak MB",
    )
    p.add_argument("--track", action="store_true", help="with --measure: live tensor bytes instead of RSS")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.measure:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(
            f"{step_peak_mb(args.config, args.overrides, args.resolution, args.measure, args.device or 'cpu', args.track):.1f}"
        )
        return 0
    effective = args.effective_batch
    if effective is None:
        from cxr.config import load_config

        cfg = load_config(args.config, args.overrides)
        effective = cfg.data.batch_size * cfg.train.grad_accum_steps
    result = choose(
        args.config,
        args.overrides,
        args.resolution,
        effective,
        args.device,
        args.fraction,
        args.budget_mb,
        args.overhead_mb,
        args.method,
        capacity_mb=args.capacity_mb,
    )
    print(json.dumps(asdict(result), indent=2))
    print(f"chosen: {result.reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
