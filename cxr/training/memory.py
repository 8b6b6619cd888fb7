"""What one training step costs in memory, for the probe (cxr.training.probe): the numerics
training would use, the peak of a step (CUDA's reserved memory, a CPU step's RSS, or the live
tensor bytes of :class:`LiveTensorPeak`), the device's budget and the memory outside torch."""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence


def training_numerics(cfg, device: str) -> dict:
    """The numerics training would use: autocast dtype (None, "bfloat16", "float16"), channels_last,
    cudnn.benchmark — as cxr.runs.distributed.make_accelerator / configure_numerics resolve them."""
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"
    autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    if autocast == "float16" and not device.startswith("cuda"):
        autocast = None  # training refuses fp16 on CPU; the probe measures what would run
    return {
        "autocast": autocast,
        "channels_last": bool(cfg.model.channels_last),
        "cudnn_benchmark": bool(
            device.startswith("cuda") and cfg.train.cudnn_benchmark and not cfg.train.deterministic
        ),
    }


class LiveTensorPeak:
    """Peak bytes of live tensor storages while active (a ``TorchDispatchMode``), starting from ``tensors``.

    Written here because torch's own tracker (``torch.distributed._tools.mem_tracker``) hooks every
    module and refuses a module run twice in one step — which activation checkpointing does — and
    is ~15× slower; this one only follows storages: counted when an op returns one, freed when
    the storage object is collected."""

    def __init__(self, tensors: Sequence = ()):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    tracker.add(t)
                return out

        self.mode = _Mode()
        for t in tensors:
            self.add(t)

    def add(self, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def step_peak_mb(
    config: str | None, overrides: Sequence[str], resolution: int, batch: int, device: str, track: bool = False
) -> float:
    """Peak memory (MB) of a training step of the config's model at [batch, 1, R, R] under its
    training numerics, in this process: CUDA reserved; CPU peak RSS, or with ``track`` the live
    tensor bytes of the second step (:class:`LiveTensorPeak`)."""
    import torch

    from cxr.config import load_config
    from cxr.models import build_model
    from cxr.models.losses import build_loss

    cfg = load_config(config, [*overrides, f"data.resolution={resolution}"])
    num = training_numerics(cfg, device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = num["cudnn_benchmark"]
    kwargs = cfg.model.kwargs()
    kwargs["pretrained"] = None  # the probe needs shapes, not weights
    model = build_model(**kwargs).to(device).train()
    loss_fn = build_loss(cfg.loss, None) if cfg.loss.name != "weighted_bce" else torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, resolution, resolution, device=device)
    if num["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, kwargs.get("num_labels", 14), device=device) < 0.2).float()
    meta = torch.zeros(batch, kwargs.get("meta_dim", 5), device=device)
    dtype = getattr(torch, num["autocast"]) if num["autocast"] else None

    def step():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x, meta).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    if track:
        step()  # the first step creates the optimizer state, counted from the start of the second
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        with LiveTensorPeak([*model.parameters(), *model.buffers(), *state, x, y, meta]) as tracker:
            step()
        return tracker.peak / 2**20
    for _ in range(2):  # the second step holds the optimizer state too
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_reserved(device) / 2**20
        del model, optimizer, x, y
        torch.cuda.empty_cache()
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_budget_mb(device: str, fraction: float) -> float:
    """``fraction`` of the device's memory: GPU total, or the CPU's available memory."""
    if device.startswith("cuda"):
        import torch

        return fraction * torch.cuda.get_device_properties(device).total_memory / 2**20
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return fraction * pages * size / 2**20


def non_torch_mb(device: str) -> float:
    """Device memory in use outside torch's allocator now (CUDA: driver's used − torch reserved)."""
    if not device.startswith("cuda"):
        return 0.0
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return max(0.0, ((total - free) - torch.cuda.memory_reserved(device)) / 2**20)


def precision_name(autocast: str | None) -> str:
    return {"bfloat16": "bf16", "float16": "fp16"}.get(autocast or "", "no")


def free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
