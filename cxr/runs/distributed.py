"""The distributed glue of training (cxr/train.py): the Accelerator and its numerics, the stop
flag every rank agrees on, BatchNorm buffer sync, replica fingerprints and gathers.

Gathers are accelerate's ``gather_object``, which flattens one level: ``gather_object([x])``
is [x of rank 0, x of rank 1, ...] on every rank, and [x] in a run without a process group.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, gather_object

from cxr.config import Config
from cxrbase.errors import CxrError, destroy_process_group  # noqa: F401 (re-used by cxr.train)

log = logging.getLogger("cxr.train")


# ----------------------------------------------------------------------------- setup
def configure_numerics(cfg: Config, cuda: bool) -> None:
    """Kernel choices of ``train.deterministic`` / ``train.cudnn_benchmark`` (before CUDA starts).

    deterministic: cuBLAS needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when its
    first handle is created), cuDNN its deterministic algorithms, and torch raises on any
    kernel without a deterministic version (warn_only=False: a silent fallback would break
    the bitwise-resume promise; the bilinear resize of the stems has its own deterministic
    path, cxr/models/stem.py). Otherwise, on CUDA, cuDNN benchmarks its algorithms."""
    if cfg.train.deterministic:
        if cuda:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        _use_deterministic_algorithms(True, compiles=cfg.train.compile)
    else:  # undo a deterministic run earlier in this process (tests, bench/gpu_check.py, notebooks)
        _use_deterministic_algorithms(False, compiles=cfg.train.compile)
        torch.backends.cudnn.deterministic = False
        if cuda:
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark


def _use_deterministic_algorithms(mode: bool, *, compiles: bool) -> None:
    """``torch.use_deterministic_algorithms(mode)`` (warn_only=False), which also sets inductor's
    ``deterministic`` flag and so imports torch._inductor and torch._dynamo: ~1 s of CPU per process
    here, for a flag only torch.compile reads. The full call when this run compiles or inductor is
    already loaded; otherwise only the global flag (the same ``torch._C`` call torch makes)."""
    if compiles or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=False)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=False)


def unwrap_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module inside the accelerator's wrapper: ``accelerator.unwrap_model(model, keep_torch_compile=False)``.

    Only under DeepSpeed is accelerate's own call made: it imports deepspeed whenever deepspeed is
    installed (1.4 s of CPU per process here, each rank of every run) just to add its engine to the
    isinstance test. Any other run's model is what ``prepare`` returned: DDP around the module, or
    the module itself (cxr compiles a separate forward, never ``model``)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def loopback_warning(env, resolve: Callable[[str], str] | None = None) -> str | None:
    """A warning when this is a multi-node run whose hostname resolves to a loopback address
    (Debian's /etc/hosts maps it to 127.0.1.1) and GLOO_SOCKET_IFNAME is unset: gloo — the stop
    flag's group, and every group on CPU — then advertises 127.0.1.1 to the other nodes."""
    import ipaddress
    import socket

    world, local = int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    if world <= local or env.get("GLOO_SOCKET_IFNAME"):
        return None
    master = env.get("MASTER_ADDR", "")
    resolve = resolve or socket.gethostbyname
    try:
        if master and ipaddress.ip_address(resolve(master)).is_loopback:
            return None  # every "node" on this machine (tests): loopback is right
        host = socket.gethostname()
        address = resolve(host)
    except (OSError, ValueError):
        return None
    if not ipaddress.ip_address(address).is_loopback:
        return None
    return (
        f"multi-node run ({world} processes, {local} on this node) but hostname {host} resolves to {address}: "
        f"the gloo group would hang — export GLOO_SOCKET_IFNAME=<this node's interface, e.g. ens5> "
        f"(and NCCL_SOCKET_IFNAME; see README 'GPU')"
    )


def import_before_process_group() -> None:
    """Import, before any process group exists, the torch modules that bind ``group.WORLD`` as a default.

    ``torch.distributed.nn.functional`` evaluates ``group=group.WORLD`` for ten functions when it is
    imported, and it is imported lazily, through ``torch._dynamo``, by whatever first builds a model
    (``torchvision.ops``). Imported after the group is up (the evaluator and ``cxr.tools.explain`` build
    their models then), those defaults hold the live group: ``destroy_process_group`` cannot free it,
    gloo's threads keep running, and the group is torn down during interpreter shutdown, where a rank
    that exits first sometimes aborts ("terminate called without an active exception", SIGABRT: 3 of
    59 two-rank ``cxr.tools.explain`` runs here before this, 0 of 100 after). Imported first, the defaults
    are None, which torch resolves to the default group at call time. Every creator of a process
    group calls this first (:func:`make_accelerator`, ``cxr.evaluation.inference.process_state``);
    tests/test_cli_teardown.py checks that no gloo thread outlives the CLI.
    """
    import torch.distributed.nn  # noqa: F401


def make_accelerator(cfg: Config) -> Accelerator:
    """Accelerator from the launcher's environment: gloo on CPU, NCCL on GPU, both with the
    collective timeout of the config (a dead peer fails the job instead of hanging it).
    Resolves ``train.mixed_precision=auto`` in ``cfg`` (the resolved value is what is saved).
    A job that asked for GPUs on a node without usable CUDA stops here (cxr.cuda_check)."""
    from cxr.cuda_check import require_cuda_if_requested

    cpu = not torch.cuda.is_available()
    require_cuda_if_requested(available=not cpu)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"
    if precision not in ("no", "bf16", "fp16"):
        raise CxrError(f"train.mixed_precision: the launcher asks for {precision!r} — valid: no | bf16 | fp16")
    if cpu and precision == "fp16":
        raise CxrError("train.mixed_precision=fp16 needs a GPU — use no (or bf16) on CPU")
    cfg.train.mixed_precision = precision
    timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or deepspeed
    # a plain single process has no process group to configure (accelerate would look for one)
    handlers = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=timeout)] if launched else []
    import_before_process_group()
    # cpu=True would turn a DeepSpeed launch into plain CPU DDP; DeepSpeed finds the CPU by itself
    from cxr.runs.tracking import accelerator_kwargs

    return Accelerator(
        cpu=cpu and not deepspeed,
        mixed_precision=precision,
        kwargs_handlers=handlers,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        **accelerator_kwargs(cfg),
    )


def configure_deepspeed(cfg: Config, accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Fill the DeepSpeed config entries our own loader cannot let accelerate infer.

    bf16: DeepSpeed's own bf16 mode casts every weight (BatchNorm included) to bf16 and expects
    bf16 inputs; a float32 image then fails at the first convolution. Instead the engine keeps
    fp32 weights (ZeRO partitions the fp32 optimizer state and gradients as before) and the
    forward runs under torch.autocast(bf16), as accelerate does for DDP: BatchNorm statistics
    and ``model.safetensors`` stay fp32, outputs are returned in fp32."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if cfg.train.mixed_precision == "bf16":
        from accelerate.utils import convert_outputs_to_fp32

        ds["bf16"] = {"enabled": False}
        model.forward = convert_outputs_to_fp32(
            torch.autocast(accelerator.device.type, dtype=torch.bfloat16)(model.forward)
        )
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum_steps
    ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes
    ds["gradient_clipping"] = cfg.train.clip_grad_norm
    fill_zero_buckets(ds, model)
    ds.setdefault("zero_allow_untested_optimizer", True)  # our torch Adam, wrapped by ZeRO
    if ds.get("zero_optimization", {}).get("stage", 0) >= 3:
        raise CxrError(
            "DeepSpeed ZeRO-3 is not supported (validation runs the unwrapped model) — use "
            "launch/configs/deepspeed_zero1.yaml or deepspeed_zero2.yaml"
        )


ZERO_BUCKET_CAP = 50_000_000
"""Largest ZeRO bucket, in elements (200 MB of fp32 gradients): ViT-B/BEiT-B (86 M parameters) use
two buckets, every CNN of the suite one bucket the size of its whole gradient."""


def fill_zero_buckets(ds: dict, model: torch.nn.Module) -> dict:
    """Size ZeRO-1/2's ``reduce_bucket_size`` / ``allgather_bucket_size`` ("auto" or absent) for the model.

    DeepSpeed's default is 5e8 elements and stage 1/2 allocate the reduce bucket whole (with
    ``contiguous_gradients``, fp32 here: 2 GB per GPU; two with ``overlap_comm``) — for a
    DenseNet-121 whose whole gradient is 28 MB. Here: the model's trainable element count, capped at
    :data:`ZERO_BUCKET_CAP`, so one bucket holds a CNN's whole gradient (one reduction per step, as
    DDP's buckets) and no buffer is larger than the gradient it carries."""
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2):
        return ds
    elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bucket = int(min(max(elements, 1), ZERO_BUCKET_CAP))
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key, "auto") == "auto":
            zero[key] = bucket
    return ds


# ----------------------------------------------------------------------------- signals
class StopFlag:
    """SIGUSR1 / SIGTERM set a flag; :meth:`agreed` all-reduces it so every rank stops at the
    same step boundary, whichever rank (or all) got the signal."""

    def __init__(
        self,
        accelerator: Accelerator,
        timeout_s: float = 90.0,
        first_step_timeout_s: float | None = None,
        compiled: bool = False,
    ):
        """``timeout_s`` applies from the first completed optimizer step on; until then — and always
        when ``compiled`` (a recompilation can come at any step) — ``first_step_timeout_s`` (the
        collective timeout) does: ranks finish the first step minutes apart when they compile it
        (torch.compile, cuDNN benchmarking, DALI warm-up), and the short timeout would kill a job
        that is only slow. Both gloo groups are created here, on every rank, in the same order."""
        self.signum = 0
        self.group = self.short_group = None
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        long_s = max(first_step_timeout_s or timeout_s, timeout_s)
        if self.distributed:
            # a CPU side channel: the check costs no GPU synchronisation; its own short timeout
            # makes a dead peer fail the job within it (the others wait at the next step's check)
            self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=long_s))
            if not compiled and long_s > timeout_s:
                self.short_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def step_done(self) -> None:
        """An optimizer step has completed on every rank (call after :meth:`agreed` following it):
        from now on the short timeout applies, unless the model is compiled."""
        if self.short_group is not None:
            self.group, self.short_group = self.short_group, None

    def close(self) -> None:
        """Put back the handlers found at start (training may run inside a longer-lived process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank when any rank has been signalled (a collective: call on all ranks)."""
        self.flag[0] = self.signum
        if self.distributed:
            torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        # A signal that lands while this rank waits in the all-reduce runs its handler right
        # after the call returns: never overwrite that pending signum with the agreed 0, or
        # the signal is lost (the next step's all-reduce carries it instead).
        agreed = int(self.flag[0])
        if agreed:
            self.signum = agreed
        return agreed != 0


# ----------------------------------------------------------------------------- collectives
def skipped_samples(skipped: int, skipped_keys: list, loader, accelerator: Accelerator) -> int:
    """Corrupt samples skipped this epoch over all ranks (keys go to train.log); ``skipped`` and
    ``skipped_keys``: this rank's count before ``loader`` (a resumed epoch)."""
    report = loader.report() if loader is not None else {"skipped": 0, "skipped_keys": []}
    local = (skipped + report["skipped"], skipped_keys + list(report["skipped_keys"]))
    parts = gather_object([local])
    keys = [k for part in parts for k in part[1]]
    if keys and accelerator.is_main_process:
        log.warning("skipped %d corrupt training samples this epoch: %s", len(keys), ", ".join(keys[:20]))
    return sum(part[0] for part in parts)


def sync_buffers(net: torch.nn.Module) -> None:
    """Broadcast rank 0's buffers (BatchNorm running statistics) to all ranks.

    DDP broadcasts them at the start of each forward, so after the last step of an epoch every
    rank holds the statistics of its own last batch; validation and checkpoints need one copy."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for buffer in net.buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def replica_fingerprints(net: torch.nn.Module) -> list[str]:
    """[sha256 of rank r's state dict (keys and raw bytes in order), 16 hex] for every rank:
    data-parallel replicas must hold bitwise identical weights (a collective)."""
    digest = hashlib.sha256()
    for key, value in net.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return gather_object([digest.hexdigest()[:16]])


def log_replicas(net: torch.nn.Module) -> None:
    """train.log line: the replicas' weight fingerprints, identical or DIVERGED (a collective)."""
    fingerprints = replica_fingerprints(net)
    if len(set(fingerprints)) == 1:
        log.info("replicas: weights sha256 per rank %s — identical", fingerprints)
    else:
        log.warning("replicas: weights sha256 per rank %s — the ranks DIVERGED", fingerprints)
