"""Memory probe: the micro-batch × accumulation that fits a resolution on this device.

    python -m cxr.probe --config cxr/configs/densenet121.yaml --resolution 1024 --effective-batch 16
    python -m cxr.probe --config C --resolution 512 --measure 4      # one measurement, prints MB

A sweep keeps the effective batch (micro-batch × accumulation) and the schedule equal
across resolutions; only the micro-batch changes, chosen here. The probe runs one
forward + backward + optimizer step of the REAL model (built from the config) on
random [b, 1, R, R] inputs at b = 1 and b = 2 and measures the peak:
``torch.cuda.max_memory_allocated`` on GPU, peak RSS on CPU (each CPU measurement in
a fresh subprocess, since a process's peak RSS never goes down). Peak memory is
close to linear in b (weights, gradients and optimizer state fixed, activations per
sample), so peak(b) = base + b · per_sample predicts the largest micro-batch dividing
the effective batch that fits ``fraction`` of the device's memory. If even b = 1 does
not fit, activation checkpointing (``model.grad_checkpointing``) is switched on and
the probe repeated. bench/ablation.py checks the prediction against measured peaks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError, cli_entry

PROBE_FILE = "probe.json"  # RUN/probe.json: this module writes and reads it


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
    """Predicted peak at the chosen micro-batch."""
    measured_mb: dict

    def overrides(self) -> list[str]:
        """The training overrides this layout means."""
        return [f"data.batch_size={self.micro_batch}", f"train.grad_accum_steps={self.grad_accum}",
                f"model.grad_checkpointing={str(self.grad_checkpointing).lower()}"]


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


def _step_peak_mb(config: str | None, overrides: Sequence[str], resolution: int, batch: int, device: str) -> float:
    """Peak memory (MB) of one training step of the config's model at [batch, 1, R, R], in this process."""
    import torch

    from cxr.config import load_config
    from cxr.losses import build_loss
    from cxr.models import build_model

    cfg = load_config(config, [*overrides, f"data.resolution={resolution}"])
    kwargs = cfg.model.kwargs()
    kwargs["pretrained"] = None  # the probe needs shapes, not weights
    model = build_model(**kwargs).to(device).train()
    loss_fn = build_loss(cfg.loss, None) if cfg.loss.name != "weighted_bce" else torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, resolution, resolution, device=device)
    y = (torch.rand(batch, kwargs.get("num_labels", 14), device=device) < 0.2).float()
    meta = torch.zeros(batch, kwargs.get("meta_dim", 5), device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # the second step holds the optimizer state too
        loss = loss_fn(model(x, meta), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        del model, optimizer, x, y, loss
        torch.cuda.empty_cache()
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config: str | None, overrides: Sequence[str], resolution: int, batch: int, device: str) -> float:
    """Peak MB of one step at ``batch``: in process on GPU, in a fresh subprocess on CPU (peak RSS)."""
    if device.startswith("cuda"):
        return _step_peak_mb(config, overrides, resolution, batch, device)
    argv = [sys.executable, "-m", "cxr.probe", "--resolution", str(resolution), "--measure", str(batch),
            "--device", device, *(["--config", config] if config else []), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise CxrError(f"{config}: memory probe at {resolution} px, batch {batch} failed "
                       f"({(done.stderr.strip().splitlines() or ['?'])[-1]}) — run it alone: {' '.join(argv)}")
    return float(done.stdout.strip().splitlines()[-1])


def device_budget_mb(device: str, fraction: float) -> float:
    """``fraction`` of the device's memory: GPU total, or the CPU's available memory."""
    if device.startswith("cuda"):
        import torch

        return fraction * torch.cuda.get_device_properties(device).total_memory / 2**20
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return fraction * pages * size / 2**20


def choose(config: str | None, overrides: Sequence[str], resolution: int, effective_batch: int,
           device: str | None = None, fraction: float = 0.8, budget_mb: float | None = None) -> ProbeResult:
    """Measure at b = 1, 2 and pick the largest micro-batch dividing ``effective_batch`` that fits."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = budget_mb if budget_mb is not None else device_budget_mb(device, fraction)
    for checkpointing in (False, True):
        extra = [*overrides, f"model.grad_checkpointing={str(checkpointing).lower()}"]
        peaks = {b: measure(config, extra, resolution, b, device) for b in (1, 2)}
        per_sample = max(peaks[2] - peaks[1], 1e-3)
        base = peaks[1] - per_sample
        fits = [b for b in range(effective_batch, 0, -1)
                if effective_batch % b == 0 and base + b * per_sample <= budget]
        if fits:
            b = fits[0]
            return ProbeResult(resolution, device, effective_batch, b, effective_batch // b, checkpointing,
                               round(budget, 1), round(base, 1), round(per_sample, 2),
                               round(base + b * per_sample, 1), {str(k): round(v, 1) for k, v in peaks.items()})
    raise CxrError(f"{config}: even micro-batch 1 with activation checkpointing needs ~{peaks[1]:.0f} MB at "
                   f"{resolution} px but the budget is {budget:.0f} MB — lower the resolution or use a larger device")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cxr.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training config (YAML)")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--effective-batch", type=int, default=16, help="micro-batch × accumulation to keep (default 16)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--fraction", type=float, default=0.8, help="share of the device memory to fill (default 0.8)")
    p.add_argument("--budget-mb", type=float, default=None, help="memory budget in MB instead of --fraction")
    p.add_argument("--measure", type=int, default=None, metavar="B",
                   help="only measure one step at batch B in this process and print the peak MB")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.measure:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(f"{_step_peak_mb(args.config, args.overrides, args.resolution, args.measure, args.device or 'cpu'):.1f}")
        return 0
    result = choose(args.config, args.overrides, args.resolution, args.effective_batch, args.device,
                    args.fraction, args.budget_mb)
    print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
