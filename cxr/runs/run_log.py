"""The run log of a training (docs/run-dir.md): the one module that writes and reads
``RUN/status.json``, ``RUN/metrics.csv`` and ``RUN/throughput.csv``, and that sets up
``RUN/train.log`` (with the run dir's lock), TensorBoard and the step lines.

Every writer here is called on rank 0 only (the caller checks); the readers are for the
launchers, cxr.tools.ablation and bench/, which is why importing this module does not import torch.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cxr.runs.run_lock import RunLock
from cxrbase.atomic import atomic_write_text, remove_stale_temps
from cxrbase.errors import CxrError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from cxr.config import Config

EXIT_REQUEUE = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, try again" — the launchers requeue
STATUS, METRICS, THROUGHPUT, TRAIN_LOG = "status.json", "metrics.csv", "throughput.csv", "train.log"
log = logging.getLogger("cxr.train")
steps_log = logging.getLogger("cxr.train.steps")  # train.log only: step lines and validation notes
cache_log = logging.getLogger("cxr.data.cache")  # the node-local shard cache's line (shards.cache), as `log`


# ----------------------------------------------------------------------------- train.log
def setup_logging(run_dir: Path, main: bool) -> None:
    """Rank 0: INFO to stderr and RUN/train.log, step lines to train.log only; others: warnings."""
    for logger in (log, steps_log, cache_log):
        logger.handlers.clear()
        logger.propagate = False
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(message)s"))
    for logger in (log, cache_log):
        logger.addHandler(stream)
        logger.setLevel(logging.INFO if main else logging.WARNING)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / TRAIN_LOG)
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file)
        steps_log.addHandler(file)
        cache_log.addHandler(file)
    steps_log.setLevel(logging.INFO if main else logging.WARNING)


def lock_run_dir(cfg: Config, accelerator: Accelerator) -> RunLock | None:
    """Rank 0 takes the run dir's lock (held until the run ends); every rank raises when it is
    taken. Then logging to RUN/train.log starts, and rank 0 removes the temp files of an atomic
    write a killed run left in the run dir (``.val_predictions.parquet.*.tmp`` and the like)."""
    from accelerate.utils import gather_object

    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(cfg.checkpoint.run_dir).acquire()
        except CxrError as err:
            refused = str(err)
    refused = next((r for r in gather_object([refused]) if r), None)
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
    if lock is not None:  # under the lock no other writer uses the folder: a killed run's temp files go
        removed = remove_stale_temps(cfg.checkpoint.run_dir)
        if removed:
            log.info("removed %d temp file(s) a killed run left in %s", removed, cfg.checkpoint.run_dir)
    return lock


def log_step(bar, st, loss: float, lr: float) -> None:
    """Progress bar postfix and a train.log line (the marker tests and operators grep for)."""
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    steps_log.info(
        "step %d epoch %d step_in_epoch %d loss %.6f lr %.3e", st.global_step, st.epoch + 1, st.step_in_epoch, loss, lr
    )


def planned_epochs(cfg: Config, steps_per_epoch: int) -> int:
    """Epochs the run can reach: train.epochs, or fewer when train.max_steps ends it sooner."""
    if not cfg.train.max_steps:
        return cfg.train.epochs
    return min(cfg.train.epochs, max(1, math.ceil(cfg.train.max_steps / max(1, steps_per_epoch))))


def rate(images: float, seconds: float) -> str:
    """images/s with 3 significant digits (a slow CPU run is 0.0412 img/s, not 0.0)."""
    return f"{images / max(seconds, 1e-9):.3g} img/s"


# ----------------------------------------------------------------------------- status.json
NONCE_ENV = "CXR_RUN_NONCE"  # set by slurm/run-training.sh: "<job id>.<restart count>" of this start


def write_status(run_dir: Path, state: str, st, exit_code: int = 0, error: str | None = None) -> None:
    """RUN/status.json: running | preempted | finished | failed, for launchers deciding to requeue.

    ``epoch`` counts from 1, as train.log, metrics.csv and the stop line do (the loop's is 0-based).
    ``nonce``: $CXR_RUN_NONCE of the process that wrote it (null without one), so that a launcher
    can tell a status written by its own start from an older one without comparing file times."""
    payload = {
        "state": state,
        "epoch": st.epoch + 1,
        "step_in_epoch": st.step_in_epoch,
        "global_step": st.global_step,
        "exit_code": exit_code,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "nonce": os.environ.get(NONCE_ENV) or None,
    }
    if error is not None:
        payload["error"] = error
    atomic_write_text(run_dir / STATUS, json.dumps(payload, indent=2) + "\n")


def read_status(run_dir: str | Path) -> dict | None:
    """RUN/status.json as written by :func:`write_status`; None when there is none yet."""
    path = Path(run_dir) / STATUS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CxrError(
            f"{path}: unreadable run status ({err}) — delete it; the next training writes it again"
        ) from None


def write_failed_status(run_dir: Path, st, err: BaseException, accepted: bool = True) -> None:
    """status.json ``failed`` with the exit status the CLI will return and the one-line error.

    ``accepted`` False (refused before it started: config mismatch, bad data...): the status of
    the run already there (finished, preempted...) is left as it is and the refusal goes to
    train.log; only a run dir without a status gets ``failed``."""
    if isinstance(err, SystemExit):
        if err.code in (0, None, EXIT_REQUEUE):
            return
        code = err.code if isinstance(err.code, int) else 1
    else:
        code = 2 if isinstance(err, CxrError) else 130 if isinstance(err, KeyboardInterrupt) else 1
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    line = text if isinstance(err, CxrError) else f"{type(err).__name__}: {text}".rstrip(": ")
    if not accepted and (run_dir / STATUS).is_file():
        try:
            before = (read_status(run_dir) or {}).get("state", "?")
        except CxrError:
            before = "unreadable"
        steps_log.info("refused to start (exit %d): %s — %s left as it was (%s)", code, line, STATUS, before)
        return
    try:
        write_status(run_dir, "failed", st, exit_code=code, error=line)
    except OSError:
        pass  # a read-only or full run dir: the original error is what the user must see


# ----------------------------------------------------------------------------- metrics.csv, throughput.csv
def metrics_row(st, train_loss: float, lr: float, val: dict, skipped: int) -> dict:
    """One metrics.csv row: time, epoch (1-based), step, lr, loss, val_* metrics, skipped samples."""
    row = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "epoch": st.epoch + 1,
        "step": st.global_step,
        "lr": lr,
        "loss": train_loss,
    }
    row.update({k: v for k, v in val.items() if k.startswith("val_")})
    row["skipped"] = skipped
    return row


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """Rewrite metrics.csv from all rows (atomic; a resumed run rewrites the same rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """RUN/metrics.csv, one row per epoch (an empty frame before the first epoch ends)."""
    path = Path(run_dir) / METRICS
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: torch.cuda.max_memory_allocated on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class DataWait:
    """Wraps a batch iterator and sums the seconds spent inside ``next()``: the time the training
    loop waited for the loader (reading + decoding not hidden by its prefetch)."""

    def __init__(self, batches):
        self.batches, self.seconds = iter(batches), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - start


def record_throughput(
    run_dir: Path,
    epoch: int,
    images: int,
    train_s: float,
    epoch_s: float,
    device: torch.device,
    fetch_s: float = 0.0,
    data_wait_s: float = 0.0,
    step_s: float | None = None,
) -> None:
    """RUN/throughput.csv, one row per epoch (kept out of metrics.csv, whose rows are deterministic):
    training images/s (loop only, all ranks), seconds, peak memory of rank 0, and where rank 0's
    training time went: ``fetch_seconds`` (shards copied into the node-local cache, or waiting for
    the node's rank that copies them: shards.cache), ``data_wait_seconds`` (the loop waiting for the
    next batch: read + decode not hidden by prefetch), ``step_seconds`` (the rest of the loop:
    forward, backward, optimizer, bookkeeping)."""
    path = run_dir / THROUGHPUT
    rows = [r for r in (list(csv.DictReader(path.open())) if path.is_file() else []) if int(r["epoch"]) < epoch]
    rows.append(
        {
            "epoch": epoch,
            "images": images,
            "train_seconds": round(train_s, 3),
            "epoch_seconds": round(epoch_s, 3),
            "train_images_per_s": round(images / max(train_s, 1e-9), 3),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "fetch_seconds": round(fetch_s, 3),
            "data_wait_seconds": round(data_wait_s, 3),
            "step_seconds": round(train_s - fetch_s - data_wait_s if step_s is None else step_s, 3),
        }
    )
    for row in rows:  # rows of a run started before these columns existed: unknown, not zero
        for key in ("fetch_seconds", "data_wait_seconds", "step_seconds"):
            row.setdefault(key, "")
    write_metrics_csv(path, rows)


def read_throughput(run_dir: str | Path) -> pd.DataFrame:
    """RUN/throughput.csv, one row per epoch (an empty frame when the run has none)."""
    path = Path(run_dir) / THROUGHPUT
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


# ----------------------------------------------------------------------------- TensorBoard
def tensorboard_writer(cfg: Config, run_dir: Path, main: bool):
    """SummaryWriter on RUN/tensorboard (rank 0, when logging.tensorboard), else None."""
    if not (cfg.logging.tensorboard and main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CxrError(
            "logging.tensorboard=true needs the tensorboard package — pip install tensorboard, "
            "or set logging.tensorboard=false"
        ) from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def log_tensorboard(writer, row: dict, step: int) -> None:
    if writer is None:
        return
    for key, value in row.items():
        if isinstance(value, (int, float)) and key not in ("epoch", "step"):
            writer.add_scalar(key, value, step)
    writer.flush()


# ----------------------------------------------------------------------------- launcher query
def stopped_for_requeue(run_dir: str | Path, nonce: str) -> bool:
    """Whether RUN/status.json says ``preempted`` and was written by the start whose
    $CXR_RUN_NONCE is ``nonce`` (an older ``preempted`` — a crash after it — does not count)."""
    try:
        status = read_status(run_dir)
    except CxrError:
        return False
    return bool(status) and status.get("state") == "preempted" and bool(nonce) and status.get("nonce") == nonce


def main(argv: list[str] | None = None) -> int:
    """``python -m cxr.runs.run_log preempted RUN NONCE``: exit 0 when training stopped to be requeued
    (status.json ``preempted`` with that nonce), 1 otherwise — slurm/run-training.sh's test; no torch."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m cxr.runs.run_log", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("preempted", help="exit 0 when RUN/status.json is 'preempted' with this nonce, else 1")
    q.add_argument("run_dir")
    q.add_argument("nonce", help="the $CXR_RUN_NONCE training was started with (job id.restart count)")
    args = p.parse_args(argv)
    return 0 if stopped_for_requeue(args.run_dir, args.nonce) else 1


if __name__ == "__main__":
    sys.exit(main())
