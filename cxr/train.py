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
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed

from cxr.config import Config, config_hash, config_yaml, describe_config, load_config, save_config
from cxr.data import build_loader, image_source
from cxr.evaluation.metrics import epoch_metrics
from cxr.models import build_model
from cxr.models.losses import build_loss
from cxr.runs import checkpoint as ckpt
from cxr.runs import run_log, tracking
from cxr.runs.distributed import (
    StopFlag,
    configure_deepspeed,
    configure_numerics,
    destroy_process_group,
    log_replicas,
    loopback_warning,
    make_accelerator,
    skipped_samples,
    sync_buffers,
)
from cxr.runs.run_log import EXIT_REQUEUE, preempted  # noqa: F401 (EXIT_REQUEUE: read by launchers and tests)
from cxr.training.probe import read_probe
from cxr.training.resume import (
    TrainState,
    check_has_best,
    continue_finished_run,
    finished_run,
    restore,
    resume_checkpoint,
    save_best,
    save_last,
    update_best,
    update_early_stop,
)
from cxr.training.setup import (
    build_optimizer,
    build_scheduler,
    check_val_split,
    current_lr,
    label_names,
    open_loader,
    train_prevalence,
    train_steps_per_epoch,
)
from cxrbase.errors import CxrError, cli_entry

log = logging.getLogger("cxr.train")


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="config keys (section.key=default):\n" + describe_config(),
    )
    p.add_argument("--config", help="YAML config (cxr/configs/*.yaml); omitted: all defaults")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override a config value, parsed as YAML (optim.lr=3e-4, loss.cap=null, optim.betas=[0.9,0.99])",
    )
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
    if cfg.data.device == "gpu" and not torch.cuda.is_available():  # before any process group or model
        raise CxrError(
            "data.device=gpu: no CUDA device is visible to this process — set data.device=auto "
            "(GPU decode where CUDA is, CPU otherwise) or data.device=cpu"
        )
    configure_numerics(cfg, torch.cuda.is_available())  # before CUDA is initialised
    warning = loopback_warning(os.environ)
    if warning:  # before the process groups: with this problem their creation hangs until the timeout
        print(f"cxr.train: warning: {warning}", file=sys.stderr, flush=True)
    accelerator = make_accelerator(cfg)
    # a signal is honoured at the next step boundary; the collective timeout until the first step is done
    stop = StopFlag(accelerator, cfg.train.stop_flag_timeout_s, cfg.train.collective_timeout_s, cfg.train.compile)
    lock, st = None, TrainState()
    try:
        lock = run_log.lock_run_dir(cfg, accelerator)  # rank 0 holds it; every rank raises when it is taken
        return _train(cfg, accelerator, loader_fn, stop, st)
    except BaseException as err:
        if lock is not None:  # only the holder may write the run's status (a refused start keeps the old one)
            run_log.write_failed_status(Path(cfg.checkpoint.run_dir), st, err, accepted=st.accepted)
        raise
    finally:
        if lock is not None:
            lock.release()
        stop.close()
        tracking.close(accelerator)  # a stopped or failed run: its tracked run is closed, resumed later
        destroy_process_group()


# ----------------------------------------------------------------------------- the loop
def _train(cfg: Config, accelerator: Accelerator, loader_fn: Callable, stop: StopFlag, st: TrainState) -> int:
    """The run; ``st`` is filled in as it goes (the caller reports it when the run fails)."""
    t_start = time.time()
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir = Path(cfg.checkpoint.run_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    resume_from, changed = resume_checkpoint(cfg, run_dir)

    # Model, loss, optimizer, schedule. Same seed on every rank → same initial weights.
    label_names(cfg)  # the shards' labels must number model.num_labels: fail before any work
    if cfg.train.deterministic and cfg.model.name == "vit" and device.type == "cuda":
        from cxr.models.transformer import deterministic_input_error

        problem = deterministic_input_error(cfg.model.options, cfg.model.conv_stem, cfg.data.resolution)
        if problem:  # otherwise the first backward raises deep inside torch
            raise CxrError(f"train.deterministic: {problem}")
    set_seed(cfg.train.seed)
    model = build_model(**cfg.model.kwargs())
    if cfg.model.init_from and resume_from is None:
        init = ckpt.init_weights_from(model, cfg.model.init_from, cfg.model.kwargs())
        log.info(
            "model.init_from: weights of %s (%d tensors; re-initialised: %s); fresh optimizer and schedule",
            init["checkpoint"],
            init["loaded"],
            ", ".join(init["reinitialised"]) or "none",
        )
    uses_meta = cfg.model.metadata != "none"
    # Keras-style L2 penalty on the model's own group (CBAM head): added to the loss, no weight decay
    l2_weights = model.l2_params()[0] if hasattr(model, "l2_params") else []
    loss_fn = build_loss(cfg.loss, train_prevalence(cfg))
    optimizer = build_optimizer(cfg, model, l2_weights)
    steps_per_epoch = train_steps_per_epoch(cfg, loader_fn, rank, world)
    check_val_split(cfg, loader_fn, rank, world)  # an empty or missing val split fails now, not after an epoch
    scheduler, step_scheduler_each_step = build_scheduler(cfg, optimizer, steps_per_epoch)
    configure_deepspeed(cfg, accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # compiled after the DDP wrap, so that DDP's bucketed all-reduce stays outside the graphs;
    # only the training forward goes through it (checkpoints and accumulation use `model`)
    forward = model
    if cfg.train.compile and accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.compile()  # DeepSpeed's supported way: compiles the module inside the engine, hooks intact
    elif cfg.train.compile:
        forward = torch.compile(model)
    # the plain module (no DDP hooks, no compile wrapper): validation, buffers and restores use it
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    # Dropout streams differ per rank (a fresh seed per rank after the common init).
    set_seed(cfg.train.seed * 1000 + rank)

    if resume_from is not None:
        restore(
            cfg, accelerator, resume_from, model, optimizer, scheduler, st, steps_per_epoch, step_scheduler_each_step
        )
        if st.finished and changed:
            continue_finished_run(cfg, st, scheduler, optimizer, step_scheduler_each_step, changed)
    if st.finished:
        finished_run(cfg, st, run_dir, resume_from)
        return 0
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        run_log.write_status(run_dir, "running", st)
    st.accepted = True
    pids = gather_object([os.getpid()])
    log.info(
        "start: %d rank(s) on %s, pids %s, %s, config hash %s, %d steps/epoch, %s; %s",
        world,
        device,
        pids,
        accelerator.distributed_type.value,
        config_hash(cfg),
        steps_per_epoch,
        f"resumed from {resume_from} at epoch {st.epoch + 1} step {st.step_in_epoch}" if resume_from else "fresh",
        getattr(cfg, "device_note", None) or f"data.device={cfg.data.device}",
    )
    log.info("images: %s; resize filter: %s", *image_source(cfg.data.shards, cfg.data.resolution).values())
    probed = read_probe(run_dir)
    if probed is not None:  # the sweep's memory probe chose this run's batch layout (RUN/probe.json)
        log.info(
            "batch layout from the memory probe: %s%s",
            probed.reason,
            f" — differs from the config: {probed.differs_from_config()}" if probed.differs_from_config() else "",
        )
    writer = run_log.tensorboard_writer(cfg, run_dir, accelerator.is_main_process)
    tracking.start(accelerator, cfg, run_dir, config_hash(cfg))
    accum, log_every = cfg.train.grad_accum_steps, cfg.logging.log_every
    images_trained = 0

    def save(loader) -> None:  # `last`, with this rank's loss sum as of now
        st.loss_sum = loss_sum.item()
        save_last(cfg, accelerator, run_dir, model, optimizer, scheduler, st, loader)

    while not st.finished and st.epoch < cfg.train.epochs:
        t_epoch = time.time()
        skip = st.step_in_epoch * accum  # micro-batches already consumed this epoch (resume)
        if st.validating:  # resumed after this epoch's training: only its validation is left
            loader, batches = None, iter(())
        else:
            loader, batches = open_loader(loader_fn, cfg, "train", rank, world, epoch=st.epoch, skip_batches=skip)
        micro_total = steps_per_epoch * accum  # leftover micro-batches (< accum) are not used
        # The loss is summed on the device: reading it is a CPU-GPU sync, done every log_every steps only.
        loss_sum = torch.tensor(st.loss_sum, dtype=torch.float64, device=device)
        epoch_images = 0
        bar = run_log.progress_bar(cfg, accelerator, st, steps_per_epoch)
        model.train()
        accelerator.step = 0  # accumulation restarts at each epoch (and resume) boundary
        batches = run_log.DataWait(batches)  # the loop's wait for the loader, apart from step time
        t_loop = time.time()
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
                if l2_weights:
                    loss = loss + net.l2_penalty()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double()
            st.batches += 1
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
                run_log.log_step(bar, st, loss.item(), current_lr(optimizer))
            # One all-reduced int per step (gloo, on the CPU: no GPU sync) so that all ranks stop together.
            if stop.agreed():
                save(loader)
                return preempted(accelerator, run_dir, st, stop.signum)
            stop.step_done()  # every rank is past an optimizer step: the short timeout from here on
            if cfg.checkpoint.every_steps and st.global_step % cfg.checkpoint.every_steps == 0:
                save(loader)
            if cfg.train.max_steps and st.global_step >= cfg.train.max_steps:
                break
        if bar is not None:
            bar.close()
        t_train = time.time() - t_epoch
        fetch_s = getattr(loader, "fetch_seconds", 0.0)  # node-local shard cache (DALI from a URL)
        step_s = time.time() - t_loop - batches.seconds
        images_trained += epoch_images

        # ---- end of epoch (or of max_steps): `last` before validation, so that a stop or a failure
        # there repeats only the validation; then loss over all ranks, validation, schedule, checkpoints
        if not st.validating:
            sync_buffers(net)
            st.validating = True
            save(loader)
            if stop.agreed():
                return preempted(accelerator, run_dir, st, stop.signum)
        # all-reduce of [loss sum, batches]: a sync point, once per epoch
        totals = accelerator.reduce(torch.stack([loss_sum, torch.full_like(loss_sum, st.batches)]), reduction="sum")
        train_loss = (totals[0] / totals[1].clamp(min=1)).item()
        skipped = skipped_samples(st.skipped, st.skipped_keys, loader, accelerator)
        val = validate(cfg, accelerator, net, loader_fn, loss_fn, bool(l2_weights), stop)
        if val is None:  # stopped during validation: `last` holds everything before it
            return preempted(accelerator, run_dir, st, stop.signum)
        row = run_log.metrics_row(st, train_loss, current_lr(optimizer), val, skipped)
        st.rows.append(row)
        improved = update_best(cfg, st, val)
        early_stop = update_early_stop(cfg, st, val)
        if scheduler is not None and not step_scheduler_each_step:
            scheduler.step(val[cfg.schedule.monitor])
        st.new_epoch()  # the next epoch's position, and fresh sums
        out_of_steps = bool(cfg.train.max_steps and st.global_step >= cfg.train.max_steps)
        st.finished = early_stop or out_of_steps or st.epoch >= cfg.train.epochs
        if improved:
            save_best(cfg, accelerator, run_dir, model, st, val)
        if early_stop and cfg.train.restore_best:
            ckpt.load_weights(net, run_dir / "checkpoints" / "best")  # on every rank: weights stay identical
        save_last(cfg, accelerator, run_dir, model, optimizer, scheduler, st, None)
        if accelerator.is_main_process:
            run_log.write_metrics_csv(run_dir / run_log.METRICS, st.rows)
            run_log.record_throughput(
                run_dir,
                st.epoch,
                epoch_images * world,
                t_train,
                time.time() - t_epoch,
                device,
                fetch_s=fetch_s,
                data_wait_s=batches.seconds,
                step_s=step_s,
            )
            run_log.log_tensorboard(writer, row, st.global_step)
        tracking.log_epoch(accelerator, cfg, row, st.global_step)
        log.info(
            run_log.epoch_summary(
                cfg,
                st,
                row,
                improved,
                epoch_images * world,
                t_train,
                time.time() - t_epoch,
                run_log.planned_epochs(cfg, steps_per_epoch),
                {"fetch": fetch_s, "data wait": batches.seconds, "step": step_s},
            )
        )
        if early_stop:
            log.info(
                "early stopping: no %s improvement > %g for %d epochs%s",
                cfg.train.best_metric,
                cfg.train.early_stop_min_delta,
                st.bad_epochs,
                "; best weights restored" if cfg.train.restore_best else "",
            )
        if not st.finished and stop.agreed():  # a signal during the epoch-end work: `last` is complete
            return preempted(accelerator, run_dir, st, stop.signum)

    log_replicas(net)  # data-parallel replicas must hold bitwise identical weights
    if writer is not None:
        writer.close()
    check_has_best(cfg, st, run_dir)  # never "finished" without checkpoints/best
    if accelerator.is_main_process:
        run_log.write_status(run_dir, "finished", st)
    tracking.finish(accelerator, cfg, run_dir)
    elapsed = time.time() - t_start
    best = st.best_value if st.best_value is not None else float("nan")
    speed = (
        f"{run_log.rate(images_trained * world, elapsed)} incl. validation"
        if images_trained
        else "nothing left to train in this process"
    )
    log.info(
        "done: %d epochs, %d steps, %d images (%d rank(s)) in %.1f s (%s); best %s %.4f at epoch %d; run dir %s",
        st.epoch,
        st.global_step,
        images_trained * world,
        world,
        elapsed,
        speed,
        cfg.train.best_metric,
        best,
        st.best_epoch,
        run_dir,
    )
    return 0


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(
    cfg: Config,
    accelerator: Accelerator,
    net: torch.nn.Module,
    loader_fn: Callable,
    loss_fn,
    l2: bool = False,
    stop: StopFlag | None = None,
) -> dict | None:
    """Predict the val split (each image on exactly one rank), gather all predictions to every
    rank, and compute the loss (with the model's L2 penalty when ``l2``) and SPEC metrics on
    the whole set there (identical on all ranks).

    Returns {"val_loss", "val_mean_auroc", "val_<metric>", ..., "keys": [n], "probs": [n, 14]},
    rows sorted by key so that the result does not depend on the number of ranks.
    None when ``stop`` is agreed: checked after each of the first k batches, k the fewest
    batches of any rank (ranks may hold one batch more than others), and once at the end."""
    device = accelerator.device
    loader, batches = open_loader(
        loader_fn, cfg, "val", accelerator.process_index, accelerator.num_processes, epoch=0, train=False
    )
    checks = min(gather_object([len(loader)])) if stop is not None else 0
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
    local = (
        keys,
        torch.cat(logits).cpu().numpy() if logits else np.zeros((0, n), np.float32),
        torch.cat(labels).numpy() if labels else np.zeros((0, n), np.float32),
    )
    parts = gather_object([local])
    all_keys = [k for part in parts for k in part[0]]
    if len(set(all_keys)) != len(all_keys) or not all_keys:
        raise CxrError(
            f"validation: {len(all_keys)} predictions for {len(set(all_keys))} distinct images — "
            f"the val loader must deliver every image exactly once across ranks"
        )
    order = np.argsort(np.array(all_keys))
    z = np.concatenate([part[1] for part in parts])[order]
    y = np.concatenate([part[2] for part in parts])[order]
    loss = loss_fn(torch.from_numpy(z).to(device), torch.from_numpy(y).to(device))
    if l2:
        loss = loss + net.l2_penalty(torch.float32)
    probs = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    out = {"val_loss": float(loss.item())}
    with warnings.catch_warnings(record=True) as caught:  # zero-denominator notes: to train.log, not the console
        warnings.simplefilter("always")
        if z.shape[1] == y.shape[1]:
            out.update({f"val_{k}": float(v) for k, v in epoch_metrics(y, probs, labels=label_names(cfg)).items()})
        else:  # not a classifier (cxr/tools/ood.py's autoencoder outputs one score per image): loss only
            out["val_mean_auroc"] = float("nan")
    for w in caught:
        run_log.steps_log.info("validation: %s", w.message)
    out.update(keys=[all_keys[i] for i in order], probs=probs)
    return out


if __name__ == "__main__":
    sys.exit(main())
