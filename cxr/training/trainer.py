"""The training of one classifier (cxr/train.py is its command line): a :class:`Trainer` holds the
loop's state — config, accelerator, run dir, model, optimizer, schedule, :class:`TrainState` — and
its verbs: :meth:`~Trainer.fit`, :meth:`~Trainer.train_epoch`, :meth:`~Trainer.validate`,
:meth:`~Trainer.save`, :meth:`~Trainer.restore` and :meth:`~Trainer.preempt`. One code path for
CPU/gloo, GPU/NCCL and DeepSpeed. Its helpers take the trainer: cxr/training/resume.py (the
checkpoints' way in and out), validation.py (one strategy per kind of model) and epoch_report.py
(what each epoch reports); the run dir's log files are cxr/runs/run_log.py's."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import DistributedType, gather_object, set_seed

from cxr.config import Config, config_hash, save_config
from cxr.data import build_loader, image_source, to_device
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
    unwrap_model,
)
from cxr.runs.run_log import EXIT_REQUEUE
from cxr.training import resume
from cxr.training.epoch_report import EpochClock, progress_bar, record_epoch
from cxr.training.probe import read_probe
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
from cxr.training.state import TrainState, update_best, update_early_stop
from cxr.training.validation import validation_for
from cxrbase.errors import CxrError

log = logging.getLogger("cxr.train")


class Trainer:
    """One training run. Built before the run dir is locked (the accelerator and its process
    groups); :meth:`run` locks it, builds the model and trains; the exit status is the CLI's."""

    def __init__(self, cfg: Config, loader_fn: Callable = build_loader):
        """loader_fn: ``build_loader``-compatible factory (benchmarks and tests pass in-memory data)."""
        if cfg.data.device == "gpu" and not torch.cuda.is_available():  # before any process group or model
            raise CxrError(
                "data.device=gpu: no CUDA device is visible to this process — set data.device=auto "
                "(GPU decode where CUDA is, CPU otherwise) or data.device=cpu"
            )
        configure_numerics(cfg, torch.cuda.is_available())  # before CUDA is initialised
        warning = loopback_warning(os.environ)
        if warning:  # before the process groups: with this problem their creation hangs until the timeout
            print(f"cxr.train: warning: {warning}", file=sys.stderr, flush=True)
        self.cfg, self.loader_fn, self.run_dir = cfg, loader_fn, Path(cfg.checkpoint.run_dir)
        self.accelerator = make_accelerator(cfg)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        # a signal is honoured at the next step boundary; the collective timeout until the first step is done
        self.stop = StopFlag(
            self.accelerator, cfg.train.stop_flag_timeout_s, cfg.train.collective_timeout_s, cfg.train.compile
        )
        self.state = TrainState()
        self.validation = validation_for(cfg)
        # built by _build(): the prepared model (DDP / DeepSpeed engine) that trains and is saved, the
        # forward the training steps call (the model, or its torch.compile), and the plain module
        # (no DDP hooks, no compile wrapper) that validation, buffer syncs and weight loads use
        self.model = self.train_forward = self.unwrapped_model = None
        self.optimizer = self.scheduler = self.loss_fn = None
        self.per_step_schedule, self.steps_per_epoch, self.l2_weights = False, 0, []
        self.epoch_loss_sum: torch.Tensor | None = None  # this rank's loss sum this epoch, on the device
        self.images_trained, self.writer, self.bar = 0, None, None

    # ------------------------------------------------------------------------- the run
    def run(self) -> int:
        """Lock the run dir and train (or resume); returns the process exit status (cxr/train.py)."""
        lock = None
        try:
            lock = run_log.lock_run_dir(self.cfg, self.accelerator)  # rank 0 holds it; every rank raises when taken
            return self.fit()
        except BaseException as err:
            if lock is not None:  # only the holder may write the run's status (a refused start keeps the old one)
                run_log.write_failed_status(self.run_dir, self.state, err, accepted=self.state.accepted)
            raise
        finally:
            if lock is not None:
                lock.release()
            self.stop.close()
            tracking.close(self.accelerator)  # a stopped or failed run: its tracked run is closed, resumed later
            destroy_process_group()

    def fit(self) -> int:
        """Build, restore, then train epochs until finished or stopped; ``state`` is filled in as
        it goes (:meth:`run` reports it when the run fails)."""
        t_start = time.time()
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        resume_from, changed = resume.resume_checkpoint(self.cfg, self.run_dir)
        self._build(fresh=resume_from is None)
        st = self.state
        if resume_from is not None:
            self.restore(resume_from)
            if st.finished and changed:
                resume.continue_finished_run(self, changed)
        if st.finished:
            resume.finished_run(self.cfg, st, self.run_dir, resume_from)
            return 0
        self._start(resume_from)
        while not st.finished and st.epoch < self.cfg.train.epochs:
            clock = EpochClock(start=time.time())
            loader, stopped = self.train_epoch(clock)
            if stopped is None:
                stopped = self._end_epoch(loader, clock)
            if stopped is not None:
                return stopped
        self._finish(t_start)
        return 0

    def _build(self, fresh: bool) -> None:
        """Model, loss, optimizer, schedule, prepared for the accelerator. Same seed on every rank →
        same initial weights. ``fresh`` (not a resume): model.init_from's weights are loaded when set."""
        cfg, accelerator = self.cfg, self.accelerator
        label_names(cfg)  # the shards' labels must number model.num_labels: fail before any work
        if cfg.train.deterministic and cfg.model.name == "vit" and accelerator.device.type == "cuda":
            from cxr.models.transformer import deterministic_input_error

            problem = deterministic_input_error(cfg.model.options, cfg.model.conv_stem, cfg.data.resolution)
            if problem:  # otherwise the first backward raises deep inside torch
                raise CxrError(f"train.deterministic: {problem}")
        set_seed(cfg.train.seed)
        model = build_model(**cfg.model.kwargs())
        if cfg.model.init_from and fresh:
            init = ckpt.init_weights_from(model, cfg.model.init_from, cfg.model.kwargs())
            log.info(
                "model.init_from: weights of %s (%d tensors; re-initialised: %s); fresh optimizer and schedule",
                init["checkpoint"],
                init["loaded"],
                ", ".join(init["reinitialised"]) or "none",
            )
        # Keras-style L2 penalty on the model's own group (CBAM head): added to the loss, no weight decay
        self.l2_weights = model.l2_params()[0] if hasattr(model, "l2_params") else []
        self.loss_fn = build_loss(cfg.loss, train_prevalence(cfg))
        optimizer = build_optimizer(cfg, model, self.l2_weights)
        self.steps_per_epoch = train_steps_per_epoch(cfg, self.loader_fn, self.rank, self.world)
        check_val_split(cfg, self.loader_fn, self.rank, self.world)  # empty or missing val: fail now
        self.scheduler, self.per_step_schedule = build_scheduler(cfg, optimizer, self.steps_per_epoch)
        configure_deepspeed(cfg, accelerator, model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # compiled after the DDP wrap, so that DDP's bucketed all-reduce stays outside the graphs;
        # only the training forward goes through it (checkpoints and accumulation use `model`)
        self.train_forward = self.model
        if cfg.train.compile and accelerator.distributed_type == DistributedType.DEEPSPEED:
            self.model.compile()  # DeepSpeed's supported way: compiles the module inside the engine, hooks intact
        elif cfg.train.compile:
            self.train_forward = torch.compile(self.model)
        self.unwrapped_model = unwrap_model(accelerator, self.model)
        # Dropout streams differ per rank (a fresh seed per rank after the common init).
        set_seed(cfg.train.seed * 1000 + self.rank)

    def _start(self, resume_from: Path | None) -> None:
        """Status ``running``, the resolved config, the start lines, TensorBoard and the trackers."""
        cfg, accelerator, st = self.cfg, self.accelerator, self.state
        if accelerator.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
            run_log.write_status(self.run_dir, "running", st)
        st.accepted = True
        pids = gather_object([os.getpid()])
        log.info(
            "start: %d rank(s) on %s, pids %s, %s, config hash %s, %d steps/epoch, %s; %s",
            self.world,
            accelerator.device,
            pids,
            accelerator.distributed_type.value,
            config_hash(cfg),
            self.steps_per_epoch,
            f"resumed from {resume_from} at epoch {st.epoch + 1} step {st.step_in_epoch}" if resume_from else "fresh",
            getattr(cfg, "device_note", None) or f"data.device={cfg.data.device}",
        )
        log.info("images: %s; resize filter: %s", *image_source(cfg.data.shards, cfg.data.resolution).values())
        probed = read_probe(self.run_dir)
        if probed is not None:  # the sweep's memory probe chose this run's batch layout (RUN/probe.json)
            differs = probed.differs_from_config()
            log.info(
                "batch layout from the memory probe: %s%s",
                probed.reason,
                f" — differs from the config: {differs}" if differs else "",
            )
        self.writer = run_log.tensorboard_writer(cfg, self.run_dir, accelerator.is_main_process)
        tracking.start(accelerator, cfg, self.run_dir, config_hash(cfg))

    # ------------------------------------------------------------------------- one epoch
    def train_epoch(self, clock: EpochClock):
        """The training part of the epoch (from where a resume left it); (the train loader or None,
        an exit status when stopped by a signal — ``last`` saved — else None)."""
        cfg, accelerator, st = self.cfg, self.accelerator, self.state
        accum = cfg.train.grad_accum_steps
        skip = st.step_in_epoch * accum  # micro-batches already consumed this epoch (resume)
        if st.awaiting_validation:  # resumed after this epoch's training: only its validation is left
            loader, batches = None, iter(())
        else:
            loader, batches = open_loader(
                self.loader_fn, cfg, "train", self.rank, self.world, epoch=st.epoch, skip_batches=skip
            )
        micro_total = self.steps_per_epoch * accum  # leftover micro-batches (< accum) are not used
        # The loss is summed on the device: reading it is a CPU-GPU sync, done every log_every steps only.
        self.epoch_loss_sum = torch.tensor(st.loss_sum, dtype=torch.float64, device=accelerator.device)
        self.bar = progress_bar(self)
        self.model.train()
        accelerator.step = 0  # accumulation restarts at each epoch (and resume) boundary
        batches = run_log.DataWait(batches)  # the loop's wait for the loader, apart from step time
        t_loop, stopped = time.time(), None
        for i, batch in enumerate(batches):
            if skip + i >= micro_total:
                break
            clock.images += batch["image"].shape[0]
            loss = self._micro_step(batch)
            if not accelerator.sync_gradients:
                continue
            stopped = self._after_optimizer_step(loss, loader)
            if stopped is not None or (cfg.train.max_steps and st.global_step >= cfg.train.max_steps):
                break
        if stopped is not None:
            return loader, stopped
        if self.bar is not None:
            self.bar.close()
        clock.train_s = time.time() - clock.start
        clock.fetch_s = getattr(loader, "fetch_seconds", 0.0)  # node-local shard cache (DALI from a URL)
        clock.data_wait_s = batches.seconds
        clock.step_s = time.time() - t_loop - batches.seconds
        self.images_trained += clock.images
        return loader, None

    def _micro_step(self, batch: dict) -> torch.Tensor:
        """Forward and backward of one micro-batch (the optimizer steps when accumulation is done)."""
        cfg, accelerator, device = self.cfg, self.accelerator, self.accelerator.device
        # non_blocking: the host→device copy (uint8) overlaps the previous step's kernels on GPU
        image = to_device(batch, device)
        labels = batch["labels"].to(device, non_blocking=True)
        meta = batch["meta"].to(device, non_blocking=True) if cfg.model.metadata != "none" else None
        if cfg.model.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(self.model):
            logits = self.train_forward(image, meta)
            loss = self.loss_fn(logits, labels)
            if self.l2_weights:
                loss = loss + self.unwrapped_model.l2_penalty()
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.train.clip_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), cfg.train.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.epoch_loss_sum += loss.detach().double()
        self.state.batches += 1
        return loss

    def _after_optimizer_step(self, loss: torch.Tensor, loader) -> int | None:
        """Position, schedule, progress, the stop flag and periodic saves after an optimizer step;
        an exit status when a signal stops the run (``last`` saved), else None."""
        cfg, st = self.cfg, self.state
        st.step_in_epoch += 1
        st.global_step += 1
        if self.per_step_schedule:
            self.scheduler.step()
        if self.bar is not None:
            self.bar.update(1)
        if st.global_step % cfg.logging.log_every == 0:
            # loss.item() is a CPU-GPU sync point, hence only every log_every steps
            run_log.log_step(self.bar, st, loss.item(), current_lr(self.optimizer))
        # One all-reduced int per step (gloo, on the CPU: no GPU sync) so that all ranks stop together.
        if self.stop.agreed():
            self.save_in_epoch(loader)
            return self.preempt(self.stop.signum)
        self.stop.step_done()  # every rank is past an optimizer step: the short timeout from here on
        if cfg.checkpoint.every_steps and st.global_step % cfg.checkpoint.every_steps == 0:
            self.save_in_epoch(loader)
        return None

    def _end_epoch(self, loader, clock: EpochClock) -> int | None:
        """End of the epoch (or of max_steps): `last` before validation, so that a stop or a failure
        there repeats only the validation; then the loss over all ranks, validation, schedule,
        checkpoints and the epoch's records. An exit status when a signal stops the run, else None."""
        cfg, st = self.cfg, self.state
        if not st.awaiting_validation:
            sync_buffers(self.unwrapped_model)
            st.awaiting_validation = True
            self.save_in_epoch(loader)
            if self.stop.agreed():
                return self.preempt(self.stop.signum)
        # all-reduce of [loss sum, batches]: a sync point, once per epoch
        loss_sum = self.epoch_loss_sum
        totals = self.accelerator.reduce(
            torch.stack([loss_sum, torch.full_like(loss_sum, st.batches)]), reduction="sum"
        )
        train_loss = (totals[0] / totals[1].clamp(min=1)).item()
        skipped = skipped_samples(st.skipped, st.skipped_keys, loader, self.accelerator)
        val = self.validate()
        if val is None:  # stopped during validation: `last` holds everything before it
            return self.preempt(self.stop.signum)
        row = run_log.metrics_row(st, train_loss, current_lr(self.optimizer), val, skipped)
        st.rows.append(row)
        improved = update_best(cfg, st, val)
        early_stop = update_early_stop(cfg, st, val)
        if self.scheduler is not None and not self.per_step_schedule:
            self.scheduler.step(val[cfg.schedule.monitor])
        st.new_epoch()  # the next epoch's position, and fresh sums
        st.finished = early_stop or st.out_of_steps(cfg) or st.epoch >= cfg.train.epochs
        if improved:
            self.save("best", val)
        if early_stop and cfg.train.restore_best:  # on every rank: weights stay identical
            ckpt.load_weights(self.unwrapped_model, self.run_dir / "checkpoints" / "best")
        self.save("last")
        record_epoch(self, row, improved, early_stop, clock)
        if not st.finished and self.stop.agreed():  # a signal during the epoch-end work: `last` is complete
            return self.preempt(self.stop.signum)
        return None

    def _finish(self, t_start: float) -> None:
        """After the last epoch: replicas checked, status ``finished``, the done line."""
        cfg, st, world = self.cfg, self.state, self.world
        log_replicas(self.unwrapped_model)  # data-parallel replicas must hold bitwise identical weights
        if self.writer is not None:
            self.writer.close()
        resume.check_has_best(cfg, st, self.run_dir)  # never "finished" without checkpoints/best
        if self.accelerator.is_main_process:
            run_log.write_status(self.run_dir, "finished", st)
        tracking.finish(self.accelerator, cfg, self.run_dir)
        elapsed = time.time() - t_start
        best = st.best_value if st.best_value is not None else float("nan")
        speed = (
            f"{run_log.rate(self.images_trained * world, elapsed)} incl. validation"
            if self.images_trained
            else "nothing left to train in this process"
        )
        log.info(
            "done: %d epochs, %d steps, %d images (%d rank(s)) in %.1f s (%s); best %s %.4f at epoch %d; run dir %s",
            st.epoch,
            st.global_step,
            self.images_trained * world,
            world,
            elapsed,
            speed,
            cfg.train.best_metric,
            best,
            st.best_epoch,
            self.run_dir,
        )

    # ------------------------------------------------------------------------- verbs
    def validate(self) -> dict | None:
        """The model's validation (cxr/training/validation.py) on the whole val split; None when
        stopped by a signal during it."""
        return self.validation(self)

    def save(self, name: str, val: dict | None = None) -> None:
        """Write checkpoint ``name`` (collective): ``last`` with the state as it is, or ``best``
        with this epoch's validation ``val`` (and its val predictions)."""
        if name == "best":
            resume.save_best(self, val)
        elif name == "last":
            resume.save_last(self)
        else:
            raise ValueError(f"checkpoint name {name!r}: last or best")

    def save_in_epoch(self, loader) -> None:
        """``last`` inside the epoch (a signal, checkpoint.every_steps, before validation): with
        this rank's loss sum as of now and the train ``loader``'s skipped samples."""
        self.state.loss_sum = self.epoch_loss_sum.item()
        resume.save_last(self, loader)

    def restore(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (cxr/training/resume.py)."""
        resume.restore(self, path)

    def preempt(self, signum: int) -> int:
        """After the signal-time save: status ``preempted``, the stop line; the requeue exit status."""
        st = self.state
        if self.accelerator.is_main_process:
            run_log.write_status(self.run_dir, "preempted", st, exit_code=EXIT_REQUEUE)
        log.info(
            "stopped by %s at epoch %d step %d (global step %d): checkpoint 'last' saved — exit %d "
            "(requeue: the same command resumes)",
            signal.Signals(signum).name,
            st.epoch + 1,
            st.step_in_epoch,
            st.global_step,
            EXIT_REQUEUE,
        )
        return EXIT_REQUEUE
