"""Where a training is (cxr/training/trainer.py): the loop state saved in every ``last``
checkpoint, this rank's running sums, and the best-epoch / early-stopping bookkeeping on it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cxr.config import Config

SUMS = ("loss_sum", "batches", "skipped", "skipped_keys")  # this rank's, saved per rank in state.pt
# attribute → key in state.pt ``loop`` where they differ (the key is kept: older checkpoints resume)
SAVED_AS = {"awaiting_validation": "validating"}


@dataclass
class TrainState:
    """Where the run is. All but the SUMS fields are the loop state saved in every ``last``
    checkpoint (state.pt ``loop``); the SUMS are this rank's own for the current epoch (state.pt
    ``ranks[rank]``). Restored on resume; reported in status.json when the run fails."""

    epoch: int = 0  # current epoch, 0-based
    step_in_epoch: int = 0  # optimizer steps already taken in this epoch
    global_step: int = 0  # optimizer steps since the start of the run
    best_value: float | None = None  # best train.best_metric so far
    best_epoch: int = 0  # 1-based epoch of best_value
    early_best: float | None = None  # the value early stopping compares against (moves by > min_delta)
    bad_epochs: int = 0  # epochs since early_best last moved
    finished: bool = False
    # this epoch's training is done and `last` was saved after it: only its validation is left
    # (a resume from such a checkpoint validates, it does not train the epoch again)
    awaiting_validation: bool = False
    rows: list = field(default_factory=list)  # metrics.csv rows so far
    loss_sum: float = 0.0  # this rank's summed micro-batch loss this epoch, as of the last save
    batches: int = 0  # this rank's micro-batches this epoch
    skipped: int = 0  # corrupt samples this rank skipped this epoch before the current loader
    skipped_keys: list = field(default_factory=list)
    accepted: bool = False  # this start passed its checks and wrote status "running" (never saved)

    def loop_fields(self) -> dict:
        """The loop state by attribute name (all but the SUMS and ``accepted``)."""
        return {k: v for k, v in asdict(self).items() if k not in SUMS and k != "accepted"}

    def loop(self) -> dict:
        """The loop state as saved (state.pt ``loop``)."""
        return {SAVED_AS.get(k, k): v for k, v in self.loop_fields().items()}

    @classmethod
    def from_loop(cls, loop: dict) -> TrainState:
        """The state a saved ``loop`` (:meth:`loop`) describes; the sums start at zero."""
        attribute = {saved: name for name, saved in SAVED_AS.items()}
        return cls(**{attribute.get(k, k): v for k, v in loop.items()})

    def sums(self) -> dict:
        return {k: getattr(self, k) for k in SUMS}

    def new_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.awaiting_validation = self.epoch + 1, 0, False
        self.loss_sum, self.batches, self.skipped, self.skipped_keys = 0.0, 0, 0, []

    def out_of_steps(self, cfg: Config) -> bool:
        """train.max_steps (when set) reached."""
        return bool(cfg.train.max_steps and self.global_step >= cfg.train.max_steps)


class TrainerLike(Protocol):
    """What the trainer's helpers (resume.py, validation.py, epoch_report.py) read of a
    :class:`cxr.training.trainer.Trainer`, declared here so that they need not import the module
    that imports them. The attributes are documented there."""

    cfg: Config
    accelerator: Any
    run_dir: Path
    world: int
    model: Any
    unwrapped_model: Any
    optimizer: Any
    scheduler: Any
    per_step_schedule: bool
    steps_per_epoch: int
    loss_fn: Any
    l2_weights: list
    loader_fn: Any
    stop: Any
    validation: Any
    writer: Any
    state: TrainState


# ----------------------------------------------------------------------------- best epoch, early stopping
def _better(cfg: Config, value: float, than: float | None, delta: float = 0.0) -> bool:
    if not math.isfinite(value):
        return False
    if than is None:
        return True
    return value < than - delta if cfg.train.best_metric == "val_loss" else value > than + delta


def update_best(cfg: Config, st: TrainState, val: dict) -> bool:
    """Record a new best train.best_metric; True when this epoch is the new best."""
    value = val[cfg.train.best_metric]
    if not _better(cfg, value, st.best_value):
        return False
    st.best_value, st.best_epoch = value, st.epoch + 1
    return True


def update_early_stop(cfg: Config, st: TrainState, val: dict) -> bool:
    """Count epochs without an improvement > early_stop_min_delta; True when patience runs out."""
    value = val[cfg.train.best_metric]
    if _better(cfg, value, st.early_best, cfg.train.early_stop_min_delta):
        st.early_best, st.bad_epochs = value, 0
    else:
        st.bad_epochs += 1
    return 0 < cfg.train.early_stop_patience <= st.bad_epochs
