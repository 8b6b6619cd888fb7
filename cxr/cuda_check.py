"""Stop a job that asked for GPUs on a node whose CUDA is unusable, instead of training on the CPU.

torch falls back silently: ``torch.cuda.is_available()`` is False on a GPU node whose driver is
older than the wheel's CUDA, whose wheel is CPU-only, or whose devices are hidden or broken, and
training would then run on the CPU at ~1/100 of the speed. A job asked for GPUs when the launcher
or the scheduler says so: ``CUDA_VISIBLE_DEVICES`` lists devices (accelerate's ``gpu_ids`` sets it),
Slurm gave GPUs (``SLURM_GPUS_ON_NODE``, ``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS``), or the node has
NVIDIA devices (``/proc/driver/nvidia/gpus``). A CPU run on purpose says so:
``accelerate launch --cpu`` (``ACCELERATE_USE_CPU=true``) or ``CUDA_VISIBLE_DEVICES=``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from cxrbase.errors import CxrError

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def gpus_requested(env: Mapping[str, str], proc: Path = NVIDIA_PROC) -> str | None:
    """Why this job expects a GPU (the variable and its value), or None."""
    if env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes"):
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        if visible.strip() in ("", "-1", "NoDevFiles"):
            return None  # devices hidden on purpose
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        value = env.get(name, "").strip()
        if value and not (name == "SLURM_GPUS_ON_NODE" and value == "0"):  # a count; the others list indices
            return f"{name}={value}"
    try:
        if proc.is_dir() and any(proc.iterdir()):
            return f"this node has NVIDIA devices ({proc})"
    except OSError:
        pass
    return None


def driver_version() -> str:
    """The NVIDIA driver version as nvidia-smi (or /proc/driver/nvidia/version) reports it."""
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip().splitlines()[0]
            return f"unknown (nvidia-smi failed: {(done.stderr or done.stdout).strip().splitlines()[:1]})"
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"unknown (nvidia-smi: {err})"
    version = Path("/proc/driver/nvidia/version")
    if version.is_file():
        return version.read_text().splitlines()[0].strip()
    return "unknown (no nvidia-smi, no /proc/driver/nvidia/version: is the driver installed?)"


def cuda_unusable_reason() -> str:
    """torch's own reason why CUDA does not initialise (first line)."""
    import torch

    try:
        torch.cuda.init()
    except Exception as err:  # noqa: BLE001 — the message is the diagnosis
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return "torch.cuda.is_available() is False"


def diagnosis(why: str) -> str:
    """The one-line explanation and fix for a job that asked for GPUs (``why``) but has no usable CUDA."""
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"the job asked for GPUs ({why}) but CUDA is unusable: {cuda_unusable_reason()}; torch "
        f"{torch.__version__} is {build}, NVIDIA driver {driver_version()} — install the torch wheel for a "
        f"CUDA the driver supports (pip install torch --index-url https://download.pytorch.org/whl/cuXY; "
        f"nvidia-smi shows the highest CUDA the driver runs) or update the driver; to train on the CPU on "
        f"purpose: accelerate launch --cpu, or CUDA_VISIBLE_DEVICES="
    )


def require_cuda_if_requested(env: Mapping[str, str] | None = None, available: bool | None = None) -> None:
    """Raise CxrError when the job asked for GPUs (:func:`gpus_requested`) and CUDA is unusable."""
    import torch

    env = os.environ if env is None else env
    available = torch.cuda.is_available() if available is None else available
    if available:
        return
    why = gpus_requested(env)
    if why is not None:
        raise CxrError(f"training: {diagnosis(why)}")


def dali_gpu_advice(env: Mapping[str, str] | None = None, available: bool | None = None) -> str:
    """The fix for a DALI GPU pipeline that would not build: on a node that should have a usable
    GPU, the CUDA diagnosis (``data.device=cpu`` would only hide it); elsewhere, the CPU pipeline."""
    import torch

    env = os.environ if env is None else env
    available = torch.cuda.is_available() if available is None else available
    why = gpus_requested(env)
    if why is not None and not available:
        return diagnosis(why)
    if available:
        return (
            "torch sees CUDA but DALI does not: check that the nvidia-dali wheel matches the CUDA major "
            f"version of torch ({torch.version.cuda}), e.g. nvidia-dali-cuda120 for CUDA 12"
        )
    return "run on a CUDA machine or set data.device=cpu"
