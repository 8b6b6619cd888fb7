"""What a training reports of each epoch (cxr/training/trainer.py): the progress bar of its steps,
its timing, and at its end metrics.csv, throughput.csv, TensorBoard, the trackers and the one-line
summary in train.log. The files are written through their owner, cxr/runs/run_log.py."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from cxr.runs import run_log, tracking
from cxr.training.state import TrainerLike

log = logging.getLogger("cxr.train")


@dataclass
class EpochClock:
    """This process's account of the epoch's training part (throughput.csv, the epoch line)."""

    start: float  # time.time() at the start of the epoch
    train_s: float = 0.0  # the training part (opening the loader included)
    fetch_s: float = 0.0  # shards copied into the node-local cache (DALI from a URL)
    data_wait_s: float = 0.0  # the loop waiting for the loader
    step_s: float = 0.0  # the rest of the loop: forward, backward, optimizer, bookkeeping
    images: int = 0  # images this rank trained on


def progress_bar(trainer: TrainerLike):
    """Progress over the optimizer steps of this epoch (cxrbase.progress: tqdm on a terminal, plain
    lines in a log), rank 0 only (None elsewhere or when disabled). Under train.max_steps the bar
    ends where the run will, and the epoch count is the one the run can reach."""
    cfg, st = trainer.cfg, trainer.state
    if not (trainer.accelerator.is_main_process and cfg.logging.progress):
        return None
    from cxrbase.progress import progress

    total = trainer.steps_per_epoch
    if cfg.train.max_steps:
        total = min(total, st.step_in_epoch + max(0, cfg.train.max_steps - st.global_step))
    return progress(
        total=total,
        initial=st.step_in_epoch,
        unit="step",
        dynamic_ncols=True,
        leave=False,
        desc=f"epoch {st.epoch + 1}/{run_log.planned_epochs(cfg, trainer.steps_per_epoch)}",
    )


def record_epoch(trainer: TrainerLike, row: dict, improved: bool, early_stop: bool, clock: EpochClock) -> None:
    """metrics.csv, throughput.csv, TensorBoard (rank 0), the trackers and the epoch's lines."""
    cfg, st, accelerator = trainer.cfg, trainer.state, trainer.accelerator
    epoch_s = time.time() - clock.start
    if accelerator.is_main_process:
        run_log.write_metrics_csv(trainer.run_dir / run_log.METRICS, st.rows)
        run_log.record_throughput(
            trainer.run_dir,
            st.epoch,
            clock.images * trainer.world,
            clock.train_s,
            epoch_s,
            accelerator.device,
            fetch_s=clock.fetch_s,
            data_wait_s=clock.data_wait_s,
            step_s=clock.step_s,
        )
        run_log.log_tensorboard(trainer.writer, row, st.global_step)
    tracking.log_epoch(accelerator, cfg, row, st.global_step)
    log.info(epoch_line(trainer, row, improved, clock, epoch_s))
    if early_stop:
        log.info(
            "early stopping: no %s improvement > %g for %d epochs%s",
            cfg.train.best_metric,
            cfg.train.early_stop_min_delta,
            st.bad_epochs,
            "; best weights restored" if cfg.train.restore_best else "",
        )


def epoch_line(trainer: TrainerLike, row: dict, improved: bool, clock: EpochClock, epoch_s: float) -> str:
    """The one-line epoch summary of train.log: the row, the epochs the run can reach
    (run_log.planned_epochs), and rank 0's training rate and timing (as in throughput.csv)."""
    auroc = row.get("val_mean_auroc", float("nan"))
    # a model without labels to rank (the OOD autoencoder) shows no AUROC; a classifier's nan is n/a
    shown = (
        ""
        if not trainer.validation.shows_auroc
        else f"val_auroc {auroc:.4f} | "
        if math.isfinite(auroc)
        else "val_auroc n/a | "
    )
    text = (
        f"epoch {row['epoch']}/{run_log.planned_epochs(trainer.cfg, trainer.steps_per_epoch)} step {row['step']} | "
        f"loss {row['loss']:.4f} | val_loss {row['val_loss']:.4f} | {shown}lr {row['lr']:.2e} | "
        f"{run_log.rate(clock.images * trainer.world, clock.train_s)} | {epoch_s:.1f} s"
    )
    timing = {"fetch": clock.fetch_s, "data wait": clock.data_wait_s, "step": clock.step_s}
    text += " (" + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()) + ")"
    if row["skipped"]:
        text += f" | {row['skipped']} skipped"
    return text + (" | best" if improved else "")
