"""Train one chest X-ray classifier; one code path for CPU/gloo, GPU/NCCL and DeepSpeed.

    accelerate launch [--config_file launch/configs/X.yaml] cxr/train.py --config cxr/configs/Y.yaml key=value ...
    torchrun --nproc_per_node N -m cxr.train --config ... key=value ...
    python -m cxr.train --config ... key=value ...

The run directory (``checkpoint.run_dir``; layout in docs/run-dir.md) gets the resolved
config, ``metrics.csv`` (one row per epoch), ``checkpoints/{last,best}``, the best epoch's
``val_predictions.parquet``, ``train.log``, ``throughput.csv`` and ``status.json``. With ``checkpoint.resume=auto``
(default) the same command continues from ``last``, exactly: same weights, same data order,
same RNG streams as an uninterrupted run.

Exit status (every rank; launchers read RUN/status.json because torchrun/accelerate turn
any non-zero worker status into 1):
  0   finished (all epochs, max_steps, early stopping, or nothing left to do)
  2   bad config or input (one-line error, no traceback; --debug shows it)
  75  stopped by SIGUSR1 or SIGTERM after saving ``last`` — requeue me (EX_TEMPFAIL)
  other: a crash; a dead peer makes the others fail within train.collective_timeout_s
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`accelerate launch cxr/train.py`): import the package, not cxr/*
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, set_seed

from cxr import checkpoint as ckpt
from cxr.config import Config, config_diff, config_hash, config_yaml, describe_config, load_config, save_config
from cxr.data import build_loader, image_source, load_shards_manifest
from cxr.data.shard_index import SplitIndex, first_corrupt
from cxr.losses import build_loss
from cxr.metrics import epoch_metrics
from cxr.models import build_model
from cxr.run_lock import RunLock
from shards.atomic import atomic_write, atomic_write_text
from shards.errors import CxrError, cli_entry
from shards.labels import LABELS

EXIT_REQUEUE = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, try again" — the launchers requeue
log = logging.getLogger("cxr.train")


@dataclass
class LoopState:
    """Where the loop is; saved in every ``last`` checkpoint and restored on resume."""

    epoch: int = 0              # current epoch, 0-based
    step_in_epoch: int = 0      # optimizer steps already taken in this epoch
    global_step: int = 0        # optimizer steps since the start of the run
    best_value: float | None = None   # best train.best_metric so far
    best_epoch: int = 0         # 1-based epoch of best_value
    early_best: float | None = None   # the value early stopping compares against (moves by > min_delta)
    bad_epochs: int = 0         # epochs since early_best last moved
    finished: bool = False
    validating: bool = False    # this epoch's training is done; `last` was saved before its validation
    rows: list = field(default_factory=list)   # metrics.csv rows so far


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="config keys (section.key=default):\n" + describe_config())
    p.add_argument("--config", help="YAML config (cxr/configs/*.yaml); omitted: all defaults")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override a config value, parsed as YAML "
                   "(optim.lr=3e-4, loss.cap=null, optim.betas=[0.9,0.99])")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also CXR_DEBUG=1)")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    return train(cfg)


def train(cfg: Config, loader_fn: Callable = build_loader) -> int:
    """Run (or resume) training as configured; returns the process exit status (see module doc).

    loader_fn: ``build_loader``-compatible factory (benchmarks pass in-memory data)."""
    configure_numerics(cfg, torch.cuda.is_available())  # before CUDA is initialised
    warning = loopback_warning(os.environ)
    if warning:  # before the process groups: with this problem their creation hangs until the timeout
        print(f"cxr.train: warning: {warning}", file=sys.stderr, flush=True)
    accelerator = make_accelerator(cfg)
    stop = StopFlag(accelerator, cfg.train.stop_flag_timeout_s)  # a signal is honoured at the next step boundary
    lock, progress = None, LoopState()
    try:
        lock = lock_run_dir(cfg, accelerator)  # rank 0 holds it; every rank raises when it is taken
        return _train(cfg, accelerator, loader_fn, stop, progress)
    except BaseException as err:
        if lock is not None:  # only the holder may write the run's status
            write_failed_status(Path(cfg.checkpoint.run_dir), progress, err)
        raise
    finally:
        if lock is not None:
            lock.release()
        stop.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- the loop
def _train(cfg: Config, accelerator: Accelerator, loader_fn: Callable, stop: StopFlag, st: LoopState) -> int:
    """The run; ``st`` is filled in as it goes (the caller reports it when the run fails)."""
    t_start = time.time()
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir = Path(cfg.checkpoint.run_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    resume_from, changed = resume_checkpoint(cfg, run_dir)

    # Model, loss, optimizer, schedule. Same seed on every rank → same initial weights.
    label_names(cfg)  # the shards' labels must number model.num_labels: fail before any work
    set_seed(cfg.train.seed)
    model = build_model(**cfg.model.kwargs())
    init = None
    if cfg.model.init_from and resume_from is None:
        init = ckpt.init_weights_from(model, cfg.model.init_from, cfg.model.kwargs())
        log.info("model.init_from: weights of %s (%d tensors; re-initialised: %s); fresh optimizer and schedule",
                 init["checkpoint"], init["loaded"], ", ".join(init["reinitialised"]) or "none")
    uses_meta = cfg.model.metadata != "none"
    l2_weights, l2_lambda = model.l2_params() if hasattr(model, "l2_params") else ([], 0.0)
    loss_fn = build_loss(cfg.loss, train_prevalence(cfg))
    optimizer = build_optimizer(cfg, model, l2_weights)
    steps_per_epoch = train_steps_per_epoch(cfg, loader_fn, rank, world)
    check_val_split(cfg, loader_fn, rank, world)  # an empty or missing val split fails now, not after an epoch
    scheduler, step_scheduler_each_step = build_scheduler(cfg, optimizer, steps_per_epoch)
    configure_deepspeed(cfg, accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # compiled after the DDP wrap, so that DDP's bucketed all-reduce stays outside the graphs;
    # only the training forward goes through it (checkpoints and accumulation use `model`)
    forward = torch.compile(model) if cfg.train.compile else model
    # the plain module (no DDP hooks, no compile wrapper): validation, buffers and restores use it
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    # Dropout streams differ per rank (a fresh seed per rank after the common init).
    set_seed(cfg.train.seed * 1000 + rank)

    running = {"loss_sum": 0.0, "batches": 0, "skipped": 0, "skipped_keys": []}
    if resume_from is not None:
        saved, running = restore(cfg, accelerator, resume_from, model, optimizer, scheduler, running,
                                 steps_per_epoch, step_scheduler_each_step)
        vars(st).update(vars(saved))
        if st.finished and changed:
            continue_finished_run(cfg, st, scheduler, optimizer, step_scheduler_each_step, changed)
    if st.finished:
        if resume_from is not None and resume_from.parent.parent.resolve() != run_dir.resolve():
            raise CxrError(f"checkpoint.resume={resume_from}: that run finished at epoch {st.epoch} — nothing "
                           f"to continue; raise train.epochs to continue it, or start from its weights with "
                           f"model.init_from={resume_from.parent.parent} (fresh optimizer and schedule)")
        log.info("run %s already finished at epoch %d — nothing to do (raise train.epochs to continue it, or "
                 "model.init_from=%s in a new checkpoint.run_dir to start from its weights)", run_dir, st.epoch,
                 run_dir)
        return 0
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        write_status(run_dir, "running", st)
    pids = ckpt.gather_objects(os.getpid())
    log.info("start: %d rank(s) on %s, pids %s, %s, config hash %s, %d steps/epoch, %s",
             world, device, pids, accelerator.distributed_type.value, config_hash(cfg), steps_per_epoch,
             f"resumed from {resume_from} at epoch {st.epoch + 1} step {st.step_in_epoch}" if resume_from else "fresh")
    log.info("images: %s; resize filter: %s", *image_source(cfg.data.shards, cfg.data.resolution).values())
    writer = tensorboard_writer(cfg, run_dir, accelerator.is_main_process)
    accum, log_every = cfg.train.grad_accum_steps, cfg.logging.log_every
    images_trained = 0

    while not st.finished and st.epoch < cfg.train.epochs:
        t_epoch = time.time()
        skip = st.step_in_epoch * accum  # micro-batches already consumed this epoch (resume)
        if st.validating:  # resumed after this epoch's training: only its validation is left
            loader, batches = None, iter(())
        else:
            loader, batches = open_loader(loader_fn, cfg, "train", rank, world, epoch=st.epoch, skip_batches=skip)
        micro_total = steps_per_epoch * accum  # leftover micro-batches (< accum) are not used
        # The loss is summed on the device: reading it is a CPU-GPU sync, done every log_every steps only.
        loss_sum = torch.tensor(running["loss_sum"], dtype=torch.float64, device=device)
        n_batches, epoch_images = running["batches"], 0
        bar = progress_bar(cfg, accelerator, st, steps_per_epoch)
        model.train()
        accelerator.step = 0  # accumulation restarts at each epoch (and resume) boundary
        for i, batch in enumerate(batches):
            if skip + i >= micro_total:
                break
            # non_blocking: the host→device copy overlaps the previous step's kernels on GPU
            image = batch["image"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            meta = batch["meta"].to(device, non_blocking=True) if uses_meta else None
            if cfg.model.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                logits = forward(image, meta)
                loss = loss_fn(logits, labels)
                if l2_weights:  # Keras-style L2 penalty on the model's own group (CBAM head)
                    loss = loss + l2_lambda * sum(w.pow(2).sum() for w in l2_weights)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double()
            n_batches += 1
            epoch_images += image.shape[0]
            if not accelerator.sync_gradients:
                continue
            # ---- an optimizer step has been taken
            st.step_in_epoch += 1
            st.global_step += 1
            if step_scheduler_each_step:
                scheduler.step()
            if bar is not None:
                bar.update(1)
            if st.global_step % log_every == 0:
                # loss.item() is a CPU-GPU sync point, hence only every log_every steps
                log_step(bar, st, loss.item(), current_lr(optimizer))
            # One all-reduced int per step (gloo, on the CPU: no GPU sync) so that all ranks stop together.
            if stop.agreed():
                running.update(loss_sum=loss_sum.item(), batches=n_batches)
                save_last(cfg, accelerator, run_dir, model, optimizer, scheduler, st, running, loader)
                return preempted(accelerator, run_dir, st, stop)
            if cfg.checkpoint.every_steps and st.global_step % cfg.checkpoint.every_steps == 0:
                running.update(loss_sum=loss_sum.item(), batches=n_batches)
                save_last(cfg, accelerator, run_dir, model, optimizer, scheduler, st, running, loader)
            if cfg.train.max_steps and st.global_step >= cfg.train.max_steps:
                break
        if bar is not None:
            bar.close()
        t_train = time.time() - t_epoch
        images_trained += epoch_images

        # ---- end of epoch (or of max_steps): `last` before validation, so that a stop or a failure
        # there repeats only the validation; then loss over all ranks, validation, schedule, checkpoints
        if not st.validating:
            sync_buffers(net)
            st.validating = True
            running.update(loss_sum=loss_sum.item(), batches=n_batches)
            save_last(cfg, accelerator, run_dir, model, optimizer, scheduler, st, running, loader)
            if stop.agreed():
                return preempted(accelerator, run_dir, st, stop)
        # all-reduce of [loss sum, batches]: a sync point, once per epoch
        totals = accelerator.reduce(torch.stack([loss_sum, torch.full_like(loss_sum, n_batches)]), reduction="sum")
        train_loss = (totals[0] / totals[1].clamp(min=1)).item()
        skipped = skipped_samples(running, loader, accelerator)
        val = validate(cfg, accelerator, net, loader_fn, loss_fn, l2_weights, l2_lambda, stop)
        if val is None:  # stopped during validation: `last` holds everything before it
            return preempted(accelerator, run_dir, st, stop)
        row = metrics_row(st, train_loss, current_lr(optimizer), val, skipped)
        st.rows.append(row)
        improved = update_best(cfg, st, val)
        early_stop = update_early_stop(cfg, st, val)
        if scheduler is not None and not step_scheduler_each_step:
            scheduler.step(val[cfg.schedule.monitor])
        st.epoch, st.step_in_epoch, st.validating = st.epoch + 1, 0, False
        running = {"loss_sum": 0.0, "batches": 0, "skipped": 0, "skipped_keys": []}
        out_of_steps = bool(cfg.train.max_steps and st.global_step >= cfg.train.max_steps)
        st.finished = early_stop or out_of_steps or st.epoch >= cfg.train.epochs
        if improved:
            save_best(cfg, accelerator, run_dir, model, st, val)
        if early_stop and cfg.train.restore_best:
            ckpt.load_weights(net, run_dir / "checkpoints" / "best")  # on every rank: weights stay identical
        save_last(cfg, accelerator, run_dir, model, optimizer, scheduler, st, running, None)
        if accelerator.is_main_process:
            write_metrics_csv(run_dir / "metrics.csv", st.rows)
            record_throughput(run_dir, st.epoch, epoch_images * world, t_train, time.time() - t_epoch, device)
            log_tensorboard(writer, row, st.global_step)
        log.info(epoch_summary(cfg, st, row, improved, epoch_images * world / max(t_train, 1e-9),
                               time.time() - t_epoch))
        if early_stop:
            log.info("early stopping: no %s improvement > %g for %d epochs%s", cfg.train.best_metric,
                     cfg.train.early_stop_min_delta, st.bad_epochs,
                     "; best weights restored" if cfg.train.restore_best else "")
        if not st.finished and stop.agreed():  # a signal during the epoch-end work: `last` is complete
            return preempted(accelerator, run_dir, st, stop)

    fingerprints = replica_fingerprints(net)
    if len(set(fingerprints)) == 1:
        log.info("replicas: weights sha256 per rank %s — identical", fingerprints)
    else:
        log.warning("replicas: weights sha256 per rank %s — the ranks DIVERGED", fingerprints)
    if writer is not None:
        writer.close()
    if accelerator.is_main_process:
        write_status(run_dir, "finished", st)
    elapsed = time.time() - t_start
    best = st.best_value if st.best_value is not None else float("nan")
    log.info("done: %d epochs, %d steps, %d images (%d rank(s)) in %.1f s (%.1f img/s incl. validation); "
             "best %s %.4f at epoch %d; run dir %s", st.epoch, st.global_step, images_trained * world, world,
             elapsed, images_trained * world / max(elapsed, 1e-9), cfg.train.best_metric, best, st.best_epoch,
             run_dir)
    return 0


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
        torch.use_deterministic_algorithms(True, warn_only=False)
    else:
        torch.use_deterministic_algorithms(False)
        if cuda:
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark


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
    return (f"multi-node run ({world} processes, {local} on this node) but hostname {host} resolves to {address}: "
            f"the gloo group would hang — export GLOO_SOCKET_IFNAME=<this node's interface, e.g. ens5> "
            f"(and NCCL_SOCKET_IFNAME; see README 'GPU')")


def make_accelerator(cfg: Config) -> Accelerator:
    """Accelerator from the launcher's environment: gloo on CPU, NCCL on GPU, both with the
    collective timeout of the config (a dead peer fails the job instead of hanging it).
    Resolves ``train.mixed_precision=auto`` in ``cfg`` (the resolved value is what is saved)."""
    cpu = not torch.cuda.is_available()
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
    # cpu=True would turn a DeepSpeed launch into plain CPU DDP; DeepSpeed finds the CPU by itself
    return Accelerator(cpu=cpu and not deepspeed, mixed_precision=precision, kwargs_handlers=handlers,
                       gradient_accumulation_steps=cfg.train.grad_accum_steps, step_scheduler_with_optimizer=False)


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
            torch.autocast(accelerator.device.type, dtype=torch.bfloat16)(model.forward))
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum_steps
    ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes
    ds["gradient_clipping"] = cfg.train.clip_grad_norm
    ds.setdefault("zero_allow_untested_optimizer", True)  # our torch Adam, wrapped by ZeRO
    if ds.get("zero_optimization", {}).get("stage", 0) >= 3:
        raise CxrError("DeepSpeed ZeRO-3 is not supported (validation runs the unwrapped model) — use "
                       "launch/configs/deepspeed_zero1.yaml or deepspeed_zero2.yaml")


def setup_logging(run_dir: Path, main: bool) -> None:
    """Rank 0: INFO to stderr and RUN/train.log, step lines to train.log only; others: warnings."""
    steps = logging.getLogger("cxr.train.steps")
    for logger in (log, steps):
        logger.handlers.clear()
        logger.propagate = False
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(stream)
    log.setLevel(logging.INFO if main else logging.WARNING)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file)
        steps.addHandler(file)
    steps.setLevel(logging.INFO if main else logging.WARNING)


# keys whose change still continues a run exactly: a longer (or shorter) run of the same trajectory
EXTENDABLE = {"train.epochs", "train.max_steps"}


def resume_checkpoint(cfg: Config, run_dir: Path) -> tuple[Path | None, list[str]]:
    """(checkpoint to continue from under ``checkpoint.resume``, config keys that differ from the
    run's), after the config-hash check: only EXTENDABLE keys may differ without force_resume."""
    policy = cfg.checkpoint.resume
    found = ckpt.find_checkpoint(run_dir, "last")
    if policy == "never":
        if found is not None:
            raise CxrError(f"{found}: the run dir already holds a checkpoint and checkpoint.resume=never — "
                           f"choose a new checkpoint.run_dir or set checkpoint.resume=auto")
        return None, []
    if policy != "auto":
        found = Path(policy)
        if not (found / ckpt.META).is_file():
            raise CxrError(f"checkpoint.resume={policy}: no checkpoint there (no {ckpt.META}) — "
                           f"use auto, never, or a path like RUN/checkpoints/last")
    if found is None:
        return None, []
    meta, want = ckpt.read_meta(found), config_hash(cfg)
    if meta.get("config_hash") == want:
        return found, []
    changed = saved_config_diff(cfg, found, meta.get("config_hash"))
    if changed and set(changed) <= EXTENDABLE or cfg.checkpoint.force_resume:
        return found, changed
    raise CxrError(f"{found}: written under config hash {meta.get('config_hash')}, this config is {want} "
                   f"(differs in: {', '.join(changed) or 'unknown keys'}) — use a new "
                   f"checkpoint.run_dir, restore the old values, or set checkpoint.force_resume=true")


def saved_config_diff(cfg: Config, found: Path, saved_hash: str | None = None) -> list[str]:
    """Keys that differ between ``cfg`` and the config.yaml of the run the checkpoint belongs to
    ([] when that file is unreadable or, given ``saved_hash``, is not the checkpoint's config)."""
    saved = found.parent.parent / "config.yaml"
    try:
        old = load_config(saved)
    except CxrError:
        return []
    if saved_hash is not None and config_hash(old) != saved_hash:
        return []
    return config_diff(old, cfg)


def continue_finished_run(cfg: Config, st: LoopState, scheduler, optimizer, per_step: bool,
                          changed: list[str]) -> None:
    """A finished run resumed with more epochs (or steps): un-finish it when there is work left."""
    out_of_steps = bool(cfg.train.max_steps and st.global_step >= cfg.train.max_steps)
    if st.epoch >= cfg.train.epochs or out_of_steps:
        return
    st.finished = False
    how = "plateau: continues from its saved state" if scheduler is not None and not per_step else "constant"
    if per_step and scheduler is not None:
        before = current_lr(optimizer)
        realign_schedule(scheduler, optimizer, scheduler.last_epoch)
        how = f"recomputed for the new length: lr {before:.3e} → {current_lr(optimizer):.3e}"
    log.info("continuing the finished run (%s changed) at epoch %d of %d; LR schedule %s",
             ", ".join(changed), st.epoch + 1, cfg.train.epochs, how)


def realign_schedule(scheduler, optimizer, position: int) -> None:
    """Put a per-step LambdaLR at step ``position`` of the schedule as now configured."""
    scheduler.last_epoch = position
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(position)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def check_val_split(cfg: Config, loader_fn: Callable, rank: int, world: int) -> None:
    """Build the val loader once before epoch 1: a missing, empty or corrupt split fails before
    any training (each rank reads its share of the val samples' bytes with the loaders' checks)."""
    bad = None
    try:
        with torch.random.fork_rng(devices=[]):
            loader = loader_fn(cfg.data, "val", rank=rank, world_size=world, epoch=0, train=False)
        batches = len(loader)
        if isinstance(getattr(loader, "index", None), SplitIndex):  # shards (not in-memory data)
            found = first_corrupt(loader.index, rank, world)
            bad = None if found is None else str(found.as_error())
    except CxrError as err:
        if "no shards for split 'val'" not in str(err):
            raise
        batches = 0
    counts, errors = zip(*ckpt.gather_objects((batches, bad)))
    if sum(counts) == 0:
        raise CxrError(f"{cfg.data.shards}: split 'val' has 0 samples — validation needs some: re-split "
                       f"with a val fraction > 0 (python -m shards split --fractions 0.7,0.15,0.15) and re-pack")
    if any(errors):
        raise CxrError(next(e for e in errors if e))


def lock_run_dir(cfg: Config, accelerator: Accelerator) -> RunLock | None:
    """Rank 0 takes the run dir's lock (held until the run ends); every rank raises when it is
    taken. Then logging to RUN/train.log starts."""
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(cfg.checkpoint.run_dir).acquire()
        except CxrError as err:
            refused = str(err)
    refused = next((r for r in ckpt.gather_objects(refused) if r), None)
    if refused:
        raise CxrError(refused)
    try:
        setup_logging(Path(cfg.checkpoint.run_dir), accelerator.is_main_process)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if lock is not None and lock.stale:
        log.warning("%s", lock.stale)
    return lock


def write_failed_status(run_dir: Path, st: LoopState, err: BaseException) -> None:
    """status.json ``failed`` with the exit status the CLI will return and the one-line error."""
    if isinstance(err, SystemExit):
        if err.code in (0, None, EXIT_REQUEUE):
            return
        code = err.code if isinstance(err.code, int) else 1
    else:
        code = 2 if isinstance(err, CxrError) else 130 if isinstance(err, KeyboardInterrupt) else 1
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    line = text if isinstance(err, CxrError) else f"{type(err).__name__}: {text}".rstrip(": ")
    try:
        write_status(run_dir, "failed", st, exit_code=code, error=line)
    except OSError:
        pass  # a read-only or full run dir: the original error is what the user must see


@functools.lru_cache(maxsize=8)
def _label_names(shards: str, resolution: int, num_labels: int) -> tuple[str, ...]:
    if not (Path(shards) / "manifest.json").is_file():  # in-memory loaders of the tests
        return tuple(LABELS) if num_labels == len(LABELS) else tuple(f"label_{i}" for i in range(num_labels))
    folder, manifest = load_shards_manifest(shards, resolution)
    names = tuple(manifest.get("labels") or LABELS)
    if len(names) != num_labels:
        raise CxrError(f"{folder}/manifest.json: the shards have {len(names)} label(s) ({', '.join(names[:5])}) "
                       f"but model.num_labels={num_labels} — set model.num_labels={len(names)}")
    return names


def label_names(cfg: Config) -> list[str]:
    """The run's label names: the shards manifest's (the 14 NIH ones or a generic table's), which
    must number model.num_labels; without a manifest, the NIH names or label_0, label_1, ..."""
    return list(_label_names(str(cfg.data.shards), cfg.data.resolution, cfg.model.num_labels))


def train_prevalence(cfg: Config) -> np.ndarray | None:
    """[num_labels] train-split prevalence from the shards manifest (only weighted_bce needs it)."""
    if cfg.loss.name != "weighted_bce":
        return None
    folder, manifest = load_shards_manifest(cfg.data.shards, cfg.data.resolution)
    prevalence = manifest.get("splits", {}).get("train", {}).get("prevalence", {})
    names = label_names(cfg)
    missing = [name for name in names if name not in prevalence]
    if missing:
        raise CxrError(f"{folder}/manifest.json: splits.train.prevalence lacks {missing[:3]} — re-pack the shards")
    return np.array([prevalence[name] for name in names], dtype=np.float64)


def build_optimizer(cfg: Config, model: torch.nn.Module, l2_weights: list) -> torch.optim.Optimizer:
    """Adam/AdamW; weights with the model's own L2 penalty get no weight decay on top."""
    l2_ids = {id(p) for p in l2_weights}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in l2_ids],
               "weight_decay": cfg.optim.weight_decay}]
    if l2_weights:
        groups.append({"params": list(l2_weights), "weight_decay": 0.0})
    cls = torch.optim.Adam if cfg.optim.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def train_steps_per_epoch(cfg: Config, loader_fn: Callable, rank: int, world: int) -> int:
    """Optimizer steps per epoch (every epoch has the same number of train batches per rank)."""
    with torch.random.fork_rng(devices=[]):
        batches = len(loader_fn(cfg.data, "train", rank=rank, world_size=world, epoch=0, skip_batches=0))
    steps = batches // cfg.train.grad_accum_steps
    if batches % cfg.train.grad_accum_steps:
        log.warning("train: %d batches per rank per epoch is not a multiple of train.grad_accum_steps=%d — "
                    "the last %d micro-batches of every epoch are left out", batches, cfg.train.grad_accum_steps,
                    batches % cfg.train.grad_accum_steps)
    if steps < 1:
        raise CxrError(f"train: {batches} batches per rank per epoch < train.grad_accum_steps="
                       f"{cfg.train.grad_accum_steps} — lower it or data.batch_size")
    return steps


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler or None, stepped per optimizer step?) — plateau steps per epoch on the monitor."""
    sc = cfg.schedule
    if sc.name == "plateau":
        mode = "min" if sc.monitor == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=sc.factor, patience=sc.patience, threshold=sc.min_delta,
            threshold_mode="abs", min_lr=sc.min_lr), False
    if sc.name == "constant":
        return None, False
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    warmup = int(round(sc.warmup_epochs * steps_per_epoch))
    floor = sc.min_lr / cfg.optim.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True


def open_loader(loader_fn: Callable, cfg: Config, split: str, rank: int, world: int, **kwargs):
    """(loader, iterator) built without touching the global RNG streams: a torch DataLoader draws
    its worker seed from them, which would make a resumed run's dropout masks differ."""
    with torch.random.fork_rng(devices=[]):
        loader = loader_fn(cfg.data, split, rank=rank, world_size=world, **kwargs)
        return loader, iter(loader)


def restore(cfg: Config, accelerator: Accelerator, path: Path, model, optimizer, scheduler, running: dict,
            steps_per_epoch: int, per_step_schedule: bool):
    """Load ``path`` into the prepared objects; return (LoopState, this rank's running sums).

    With another world size the position in the epoch's permutation (samples consumed) is kept:
    the step in the epoch is recomputed for the new global batch, and the running sums of all
    saved ranks go to rank 0 (the epoch's mean loss stays that of the same samples)."""
    state = ckpt.load_checkpoint(accelerator, path, model=model, optimizer=optimizer, scheduler=scheduler)
    for group, lr in zip(optimizer.param_groups, state["lrs"]):
        group["lr"] = lr
    st = LoopState(**state["loop"])
    if state["rank"] is not None:
        return st, {**running, **{k: v for k, v in state["rank"].items() if k != "rng"}}
    saved_world, world = state.get("world_size"), accelerator.num_processes
    old_step = st.step_in_epoch
    st.step_in_epoch = steps_per_epoch if st.validating else resume_step(cfg, state, world, steps_per_epoch, path)
    if per_step_schedule and scheduler is not None:
        realign_schedule(scheduler, optimizer, st.epoch * steps_per_epoch + st.step_in_epoch)
    if accelerator.is_main_process:
        ranks = state["ranks"]
        running = {**running, "loss_sum": sum(r.get("loss_sum", 0.0) for r in ranks),
                   "batches": sum(r.get("batches", 0) for r in ranks),
                   "skipped": sum(r.get("skipped", 0) for r in ranks),
                   "skipped_keys": [k for r in ranks for k in r.get("skipped_keys", [])]}
    log.warning("resume: world size %s → %d — continuing at sample %d of epoch %d's permutation (step %d of "
                "%d, was step %d); data order is exact, the per-rank RNG streams (dropout) restart",
                saved_world, world, st.step_in_epoch * world * cfg.data.batch_size * cfg.train.grad_accum_steps,
                st.epoch + 1, st.step_in_epoch, steps_per_epoch, old_step)
    return st, running


def resume_step(cfg: Config, state: dict, world: int, steps_per_epoch: int, path: Path) -> int:
    """The step in the epoch at which ``world`` ranks continue the samples consumed by the saved run."""
    saved_world = state.get("world_size") or 1
    loader = state.get("loader") or {}
    st = state["loop"]
    samples = loader.get("samples")
    if samples is None:  # checkpoints before samples were stored: micro-batches × batch × ranks
        samples = loader.get("skip_batches", st["step_in_epoch"] * cfg.train.grad_accum_steps) \
            * cfg.data.batch_size * saved_world
    per_step = cfg.data.batch_size * cfg.train.grad_accum_steps * world
    if samples % per_step:
        raise CxrError(f"{path}: saved by {saved_world} rank(s) {samples} samples into epoch {st['epoch'] + 1}; "
                       f"with {world} rank(s) a step takes {per_step} samples (data.batch_size × "
                       f"train.grad_accum_steps × ranks), which does not divide {samples} — resume with "
                       f"{saved_world} rank(s), or with a number of ranks for which it does")
    return min(samples // per_step, steps_per_epoch)


# ----------------------------------------------------------------------------- signals
class StopFlag:
    """SIGUSR1 / SIGTERM set a flag; :meth:`agreed` all-reduces it so every rank stops at the
    same step boundary, whichever rank (or all) got the signal."""

    def __init__(self, accelerator: Accelerator, timeout_s: float = 90.0):
        self.signum = 0
        self.group = None
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.distributed:
            # a CPU side channel: the check costs no GPU synchronisation; its own short timeout
            # makes a dead peer fail the job within it (the others wait at the next step's check)
            self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGUSR1, signal.SIGTERM)}

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


def preempted(accelerator: Accelerator, run_dir: Path, st: LoopState, stop: StopFlag) -> int:
    """After the signal-time save: record it and return the requeue status."""
    if accelerator.is_main_process:
        write_status(run_dir, "preempted", st, exit_code=EXIT_REQUEUE)
    log.info("stopped by %s at epoch %d step %d (global step %d): checkpoint 'last' saved — exit %d "
             "(requeue: the same command resumes)", signal.Signals(stop.signum).name, st.epoch + 1,
             st.step_in_epoch, st.global_step, EXIT_REQUEUE)
    return EXIT_REQUEUE


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(cfg: Config, accelerator: Accelerator, net: torch.nn.Module, loader_fn: Callable, loss_fn,
             l2_weights: list, l2_lambda: float, stop: StopFlag | None = None) -> dict | None:
    """Predict the val split (each image on exactly one rank), gather all predictions to every
    rank, and compute the loss and SPEC metrics on the whole set there (identical on all ranks).

    Returns {"val_loss", "val_mean_auroc", "val_<metric>", ..., "keys": [n], "probs": [n, 14]},
    rows sorted by key so that the result does not depend on the number of ranks.
    None when ``stop`` is agreed: checked after each of the first k batches, k the fewest
    batches of any rank (ranks may hold one batch more than others), and once at the end."""
    device = accelerator.device
    loader, batches = open_loader(loader_fn, cfg, "val", accelerator.process_index, accelerator.num_processes,
                                  epoch=0, train=False)
    checks = min(ckpt.gather_objects(len(loader))) if stop is not None else 0
    net.eval()
    keys, logits, labels = [], [], []
    for i, batch in enumerate(batches):
        if i < checks and stop.agreed():
            net.train()
            return None
        image = batch["image"].to(device, non_blocking=True)
        meta = batch["meta"].to(device, non_blocking=True) if cfg.model.metadata != "none" else None
        if cfg.model.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits.append(net(image, meta).float())
        labels.append(batch["labels"].float())
        keys.extend(batch["key"])
    net.train()
    if stop is not None and stop.agreed():
        return None
    n = cfg.model.num_labels
    # .cpu(): a sync point, once per validation
    local = (keys, torch.cat(logits).cpu().numpy() if logits else np.zeros((0, n), np.float32),
             torch.cat(labels).numpy() if labels else np.zeros((0, n), np.float32))
    parts = ckpt.gather_objects(local)
    all_keys = [k for part in parts for k in part[0]]
    if len(set(all_keys)) != len(all_keys) or not all_keys:
        raise CxrError(f"validation: {len(all_keys)} predictions for {len(set(all_keys))} distinct images — "
                       f"the val loader must deliver every image exactly once across ranks")
    order = np.argsort(np.array(all_keys))
    z = np.concatenate([part[1] for part in parts])[order]
    y = np.concatenate([part[2] for part in parts])[order]
    loss = loss_fn(torch.from_numpy(z).to(device), torch.from_numpy(y).to(device))
    if l2_weights:
        loss = loss + l2_lambda * sum(w.detach().float().pow(2).sum() for w in l2_weights)
    probs = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    out = {"val_loss": float(loss.item())}
    with warnings.catch_warnings(record=True) as caught:  # zero-denominator notes: to train.log, not the console
        warnings.simplefilter("always")
        if z.shape[1] == y.shape[1]:
            out.update({f"val_{k}": float(v) for k, v in epoch_metrics(y, probs, labels=label_names(cfg)).items()})
        else:  # not a classifier (cxr/ood.py's autoencoder outputs one score per image): loss only
            out["val_mean_auroc"] = float("nan")
    for w in caught:
        logging.getLogger("cxr.train.steps").info("validation: %s", w.message)
    out.update(keys=[all_keys[i] for i in order], probs=probs)
    return out


def metrics_row(st: LoopState, train_loss: float, lr: float, val: dict, skipped: int) -> dict:
    """One metrics.csv row: time, epoch (1-based), step, lr, loss, val_* metrics, skipped samples."""
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "epoch": st.epoch + 1,
           "step": st.global_step, "lr": lr, "loss": train_loss}
    row.update({k: v for k, v in val.items() if k.startswith("val_")})
    row["skipped"] = skipped
    return row


def _better(cfg: Config, value: float, than: float | None, delta: float = 0.0) -> bool:
    if not math.isfinite(value):
        return False
    if than is None:
        return True
    return value < than - delta if cfg.train.best_metric == "val_loss" else value > than + delta


def update_best(cfg: Config, st: LoopState, val: dict) -> bool:
    """Record a new best train.best_metric; True when this epoch is the new best."""
    value = val[cfg.train.best_metric]
    if not _better(cfg, value, st.best_value):
        return False
    st.best_value, st.best_epoch = value, st.epoch + 1
    return True


def update_early_stop(cfg: Config, st: LoopState, val: dict) -> bool:
    """Count epochs without an improvement > early_stop_min_delta; True when patience runs out."""
    value = val[cfg.train.best_metric]
    if _better(cfg, value, st.early_best, cfg.train.early_stop_min_delta):
        st.early_best, st.bad_epochs = value, 0
    else:
        st.bad_epochs += 1
    return 0 < cfg.train.early_stop_patience <= st.bad_epochs


def skipped_samples(running: dict, loader, accelerator: Accelerator) -> int:
    """Corrupt samples skipped this epoch over all ranks (keys go to train.log)."""
    report = loader.report() if loader is not None else {"skipped": 0, "skipped_keys": []}
    local = (running["skipped"] + report["skipped"], running["skipped_keys"] + list(report["skipped_keys"]))
    parts = ckpt.gather_objects(local)
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
    return ckpt.gather_objects(digest.hexdigest()[:16])


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_meta(cfg: Config, st: LoopState, val: dict | None = None) -> dict:
    """meta.json of a checkpoint (docs/run-dir.md)."""
    return {"epoch": st.epoch, "step_in_epoch": st.step_in_epoch, "global_step": st.global_step,
            "config_hash": config_hash(cfg), "labels": label_names(cfg), "resolution": cfg.data.resolution,
            "model": cfg.model.kwargs(), "init_from": cfg.model.init_from,
            "finished": st.finished, "best_epoch": st.best_epoch,
            "images": image_source(cfg.data.shards, cfg.data.resolution),
            "val": {k: v for k, v in (val or {}).items() if k.startswith("val_")},
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def save_last(cfg: Config, accelerator: Accelerator, run_dir: Path, model, optimizer, scheduler,
              st: LoopState, running: dict, loader) -> None:
    """Write ``last`` (collective). ``loader``: the train loader when saving mid-epoch."""
    per_rank = dict(running)
    if loader is not None:
        report = loader.report()
        per_rank.update(skipped=running["skipped"] + report["skipped"],
                        skipped_keys=running["skipped_keys"] + list(report["skipped_keys"]))
    state = {"loop": asdict(st), "lrs": [g["lr"] for g in optimizer.param_groups],
             "loader": {"epoch": st.epoch, "skip_batches": st.step_in_epoch * cfg.train.grad_accum_steps,
                        # the position in the epoch's permutation: what a resume at any world size continues
                        "samples": st.step_in_epoch * cfg.train.grad_accum_steps * cfg.data.batch_size
                        * accelerator.num_processes}}
    last_val = {f"val_{k[4:]}": v for k, v in (st.rows[-1] if st.rows else {}).items() if k.startswith("val_")}
    ckpt.save_checkpoint(accelerator, run_dir, "last", model=model, optimizer=optimizer, scheduler=scheduler,
                         state=state, per_rank=per_rank, meta=checkpoint_meta(cfg, st, last_val))


def save_best(cfg: Config, accelerator: Accelerator, run_dir: Path, model, st: LoopState, val: dict) -> None:
    """Write ``best`` (weights + meta, collective) and, on rank 0, the val predictions of this epoch."""
    ckpt.save_checkpoint(accelerator, run_dir, "best", model=model, meta=checkpoint_meta(cfg, st, val))
    if accelerator.is_main_process:
        names = label_names(cfg)
        columns = names if val["probs"].shape[1] == len(names) else None  # None: ood_ae's one score
        frame = pd.DataFrame(val["probs"], columns=columns)
        frame.columns = [str(c) for c in frame.columns]
        frame.insert(0, "key", val["keys"])
        with atomic_write(run_dir / "val_predictions.parquet") as fh:
            frame.to_parquet(fh, index=False)


def write_status(run_dir: Path, state: str, st: LoopState, exit_code: int = 0, error: str | None = None) -> None:
    """RUN/status.json: running | preempted | finished | failed, for launchers deciding to requeue."""
    payload = {"state": state, "epoch": st.epoch, "step_in_epoch": st.step_in_epoch,
               "global_step": st.global_step, "exit_code": exit_code,
               "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if error is not None:
        payload["error"] = error
    atomic_write_text(run_dir / "status.json", json.dumps(payload, indent=2) + "\n")


# ----------------------------------------------------------------------------- logging
def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: torch.cuda.max_memory_allocated on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def record_throughput(run_dir: Path, epoch: int, images: int, train_s: float, epoch_s: float,
                      device: torch.device) -> None:
    """RUN/throughput.csv, one row per epoch (kept out of metrics.csv, whose rows are deterministic):
    training images/s (loop only, all ranks), seconds, peak memory of rank 0."""
    path = run_dir / "throughput.csv"
    rows = [r for r in (list(csv.DictReader(path.open())) if path.is_file() else []) if int(r["epoch"]) < epoch]
    rows.append({"epoch": epoch, "images": images, "train_seconds": round(train_s, 3),
                 "epoch_seconds": round(epoch_s, 3), "train_images_per_s": round(images / max(train_s, 1e-9), 3),
                 "peak_memory_mb": round(peak_memory_mb(device), 1)})
    write_metrics_csv(path, rows)


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """Rewrite metrics.csv from all rows (atomic; a resumed run rewrites the same rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def progress_bar(cfg: Config, accelerator: Accelerator, st: LoopState, steps_per_epoch: int):
    """tqdm over the optimizer steps of this epoch, rank 0 only (None elsewhere or when disabled)."""
    if not (accelerator.is_main_process and cfg.logging.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=steps_per_epoch, initial=st.step_in_epoch, desc=f"epoch {st.epoch + 1}/{cfg.train.epochs}",
                unit="step", dynamic_ncols=True, leave=False)


def log_step(bar, st: LoopState, loss: float, lr: float) -> None:
    """Progress bar postfix and a train.log line (the marker tests and operators grep for)."""
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    logging.getLogger("cxr.train.steps").info("step %d epoch %d step_in_epoch %d loss %.6f lr %.3e",
                                              st.global_step, st.epoch + 1, st.step_in_epoch, loss, lr)


def epoch_summary(cfg: Config, st: LoopState, row: dict, improved: bool, img_s: float, seconds: float) -> str:
    """The one-line epoch summary."""
    text = (f"epoch {row['epoch']}/{cfg.train.epochs} step {row['step']} | loss {row['loss']:.4f} | "
            f"val_loss {row['val_loss']:.4f} | val_auroc {row['val_mean_auroc']:.4f} | lr {row['lr']:.2e} | "
            f"{img_s:.1f} img/s | {seconds:.1f} s")
    if row["skipped"]:
        text += f" | {row['skipped']} skipped"
    return text + (" | best" if improved else "")


def tensorboard_writer(cfg: Config, run_dir: Path, main: bool):
    """SummaryWriter on RUN/tensorboard (rank 0, when logging.tensorboard), else None."""
    if not (cfg.logging.tensorboard and main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CxrError("logging.tensorboard=true needs the tensorboard package — pip install tensorboard, "
                       "or set logging.tensorboard=false") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def log_tensorboard(writer, row: dict, step: int) -> None:
    if writer is None:
        return
    for key, value in row.items():
        if isinstance(value, (int, float)) and key not in ("epoch", "step"):
            writer.add_scalar(key, value, step)
    writer.flush()


if __name__ == "__main__":
    sys.exit(main())
