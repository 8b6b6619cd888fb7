"""A training's state and its way in and out of checkpoints (cxr/train.py; docs/run-dir.md
"Resume and requeue"): which checkpoint a run continues from, restoring it (also at another
world size), continuing a finished run, and saving ``last`` / ``best``. The checkpoint files
themselves are cxr/runs/checkpoint.py's."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from accelerate import Accelerator

from cxr.config import Config, config_diff, config_hash, hashed_dict, load_config
from cxr.data import image_source
from cxr.evaluation.predictions import write_val_predictions
from cxr.runs import checkpoint as ckpt
from cxr.training.setup import current_lr, label_names
from cxrbase.errors import CxrError

log = logging.getLogger("cxr.train")
# keys whose change still continues a run exactly: a longer (or shorter) run of the same trajectory
EXTENDABLE = {"train.epochs", "train.max_steps"}
SUMS = ("loss_sum", "batches", "skipped", "skipped_keys")  # this rank's, saved per rank in state.pt


@dataclass
class TrainState:
    """Where the run is. All but the SUMS fields are the loop state saved in every ``last``
    checkpoint (state.pt ``loop``); the SUMS are this rank's own for the current epoch (state.pt
    ``ranks[rank]``). Restored on resume; the caller reports it when the run fails."""

    epoch: int = 0  # current epoch, 0-based
    step_in_epoch: int = 0  # optimizer steps already taken in this epoch
    global_step: int = 0  # optimizer steps since the start of the run
    best_value: float | None = None  # best train.best_metric so far
    best_epoch: int = 0  # 1-based epoch of best_value
    early_best: float | None = None  # the value early stopping compares against (moves by > min_delta)
    bad_epochs: int = 0  # epochs since early_best last moved
    finished: bool = False
    validating: bool = False  # this epoch's training is done; `last` was saved before its validation
    rows: list = field(default_factory=list)  # metrics.csv rows so far
    loss_sum: float = 0.0  # this rank's summed micro-batch loss this epoch, as of the last save
    batches: int = 0  # this rank's micro-batches this epoch
    skipped: int = 0  # corrupt samples this rank skipped this epoch before the current loader
    skipped_keys: list = field(default_factory=list)
    accepted: bool = False  # this start passed its checks and wrote status "running" (never saved)

    def loop(self) -> dict:
        """The loop state as saved (state.pt ``loop``)."""
        return {k: v for k, v in asdict(self).items() if k not in SUMS and k != "accepted"}

    def sums(self) -> dict:
        return {k: getattr(self, k) for k in SUMS}

    def new_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.validating = self.epoch + 1, 0, False
        self.loss_sum, self.batches, self.skipped, self.skipped_keys = 0.0, 0, 0, []


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


# ----------------------------------------------------------------------------- which checkpoint
def resume_checkpoint(cfg: Config, run_dir: Path) -> tuple[Path | None, list[str]]:
    """(checkpoint to continue from under ``checkpoint.resume``, config keys that differ from the
    run's), after the config-hash check: only EXTENDABLE keys may differ without force_resume."""
    policy = cfg.checkpoint.resume
    found = ckpt.find_checkpoint(run_dir, "last")
    if policy == "never":
        if found is not None:
            raise CxrError(
                f"{found}: the run dir already holds a checkpoint and checkpoint.resume=never — "
                f"choose a new checkpoint.run_dir or set checkpoint.resume=auto"
            )
        return None, []
    if policy != "auto":
        found = Path(policy)
        if not (found / ckpt.META).is_file():
            raise CxrError(
                f"checkpoint.resume={policy}: no checkpoint there (no {ckpt.META}) — "
                f"use auto, never, or a path like RUN/checkpoints/last"
            )
    if found is None:
        return None, []
    meta, want = ckpt.read_meta(found), config_hash(cfg)
    check_same_data(cfg, found, meta)
    if meta.get("config_hash") == want:
        return found, []
    changed = saved_config_diff(cfg, found, meta.get("config_hash"))
    if changed and set(changed) <= EXTENDABLE:
        return found, changed
    if cfg.checkpoint.force_resume:
        log.warning(
            "checkpoint.force_resume: continuing %s (config hash %s) under config hash %s — changed: %s",
            found,
            meta.get("config_hash"),
            want,
            "; ".join(describe_changes(cfg, found, changed)) or "unknown keys (its config.yaml is unreadable)",
        )
        return found, changed
    raise CxrError(
        f"{found}: written under config hash {meta.get('config_hash')}, this config is {want} "
        f"(differs in: {', '.join(changed) or 'unknown keys'}) — use a new "
        f"checkpoint.run_dir, restore the old values, or set checkpoint.force_resume=true"
    )


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


def describe_changes(cfg: Config, found: Path, changed: list[str]) -> list[str]:
    """``section.key old → new`` for each changed key (the run's config.yaml against ``cfg``)."""
    try:
        old = hashed_dict(load_config(found.parent.parent / "config.yaml"))
    except CxrError:
        return []
    new = hashed_dict(cfg)
    out = []
    for key in changed:
        section, _, name = key.partition(".")
        out.append(f"{key} {old.get(section, {}).get(name)} → {new.get(section, {}).get(name)}")
    return out


# ----------------------------------------------------------------------------- the data a checkpoint was trained on
def data_identity(cfg: Config) -> dict | None:
    """What a checkpoint records of the shards it was trained on: the manifest.json read (derived
    or masters), its sha256 and the samples per split — None without readable shards (in-memory
    data). A re-pack (other samples, order or shards) changes the digest."""
    import hashlib

    from cxr.data import load_shards_manifest

    try:
        folder, manifest = load_shards_manifest(cfg.data.shards, cfg.data.resolution)
        from shards import remote

        digest = hashlib.sha256(remote.read_bytes(folder / "manifest.json")).hexdigest()
    except (CxrError, OSError):
        return None
    return {
        "manifest": str(folder / "manifest.json"),
        "manifest_sha256": digest,
        "samples": {split: stats.get("samples") for split, stats in sorted(manifest.get("splits", {}).items())},
    }


def check_same_data(cfg: Config, found: Path, meta: dict) -> None:
    """Refuse to continue a checkpoint whose shards were re-packed or replaced since (its position in
    the epoch's permutation and its sums would not be those of the data read now) — or, with
    checkpoint.force_resume, say what changed and continue. Checkpoints before this record: no check."""
    saved = meta.get("data")
    if not saved or meta.get("finished"):
        return
    now = data_identity(cfg)
    if now is None or now["manifest_sha256"] == saved.get("manifest_sha256"):
        return
    before, after = saved.get("samples") or {}, now["samples"]
    what = [
        f"{split} {before.get(split)} → {after.get(split)} samples"
        for split in sorted(set(before) | set(after))
        if before.get(split) != after.get(split)
    ]
    if saved.get("manifest") != now["manifest"]:
        what.append(f"manifest {saved.get('manifest')} → {now['manifest']}")
    what = ", ".join(what) or "same sample counts, manifest.json re-written (re-packed)"
    if cfg.checkpoint.force_resume:
        log.warning(
            "checkpoint.force_resume: the shards changed since %s (%s) — continuing at its step in the "
            "epoch over the new data: the epoch's order and sums are no longer those of one run",
            found,
            what,
        )
        return
    raise CxrError(
        f"{now['manifest']}: the shards changed since {found} was saved ({what}) — restore the shards "
        f"it was trained on, use a new checkpoint.run_dir, or set checkpoint.force_resume=true"
    )


def finished_run(cfg: Config, st: TrainState, run_dir: Path, resume_from: Path | None) -> None:
    """A run whose ``last`` says finished: nothing to do here (logged), or refused when that
    checkpoint belongs to another run dir."""
    check_has_best(cfg, st, run_dir)
    if resume_from is not None and resume_from.parent.parent.resolve() != run_dir.resolve():
        raise CxrError(
            f"checkpoint.resume={resume_from}: that run finished at epoch {st.epoch} — nothing "
            f"to continue; raise train.epochs to continue it, or start from its weights with "
            f"model.init_from={resume_from.parent.parent} (fresh optimizer and schedule)"
        )
    log.info(
        "run %s already finished at epoch %d — nothing to do (raise train.epochs to continue it, or "
        "model.init_from=%s in a new checkpoint.run_dir to start from its weights)",
        run_dir,
        st.epoch,
        run_dir,
    )


def check_has_best(cfg: Config, st: TrainState, run_dir: Path) -> None:
    """A run that ends with no epoch ever best (its best metric NaN every epoch) has no
    ``checkpoints/best`` to evaluate: a CxrError (status ``failed``), never ``finished``."""
    if st.best_value is not None:
        return
    last = st.rows[-1].get(cfg.train.best_metric) if st.rows else None
    raise CxrError(
        f"{run_dir}: no epoch of {st.epoch} had a finite {cfg.train.best_metric} (last {last}), so "
        f"there is no best checkpoint and the run cannot count as finished — check the val split "
        f"(val_mean_auroc needs a label with both classes), or train with train.best_metric=val_loss "
        f"in a new checkpoint.run_dir"
    )


def continue_finished_run(
    cfg: Config, st: TrainState, scheduler, optimizer, per_step: bool, changed: list[str]
) -> None:
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
    log.info(
        "continuing the finished run (%s changed) at epoch %d of %d; LR schedule %s",
        ", ".join(changed),
        st.epoch + 1,
        cfg.train.epochs,
        how,
    )


def realign_schedule(scheduler, optimizer, position: int) -> None:
    """Put a per-step LambdaLR at step ``position`` of the schedule as now configured."""
    scheduler.last_epoch = position
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(position)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ----------------------------------------------------------------------------- restore
def restore(
    cfg: Config,
    accelerator: Accelerator,
    path: Path,
    model,
    optimizer,
    scheduler,
    st: TrainState,
    steps_per_epoch: int,
    per_step_schedule: bool,
) -> None:
    """Load ``path`` into the prepared objects and ``st`` (loop state and this rank's sums).

    With another world size the position in the epoch's permutation (samples consumed) is kept:
    the step in the epoch is recomputed for the new global batch, and the running sums of all
    saved ranks go to rank 0 (the epoch's mean loss stays that of the same samples)."""
    state = ckpt.load_checkpoint(accelerator, path, model=model, optimizer=optimizer, scheduler=scheduler)
    for group, lr in zip(optimizer.param_groups, state["lrs"]):
        group["lr"] = lr
    vars(st).update(TrainState(**state["loop"]).loop())
    if state["rank"] is not None:
        for key, value in state["rank"].items():
            if key != "rng":
                setattr(st, key, value)
        if not st.validating:
            remap_position(
                cfg,
                state,
                accelerator.num_processes,
                steps_per_epoch,
                st,
                path,
                scheduler,
                optimizer,
                per_step_schedule,
            )
        return
    saved_world, world = state.get("world_size"), accelerator.num_processes
    old_step = st.step_in_epoch
    st.step_in_epoch = steps_per_epoch if st.validating else resume_step(cfg, state, world, steps_per_epoch, path)
    if per_step_schedule and scheduler is not None:
        realign_schedule(scheduler, optimizer, st.epoch * steps_per_epoch + st.step_in_epoch)
    if accelerator.is_main_process:
        ranks = state["ranks"]
        st.loss_sum = sum(r.get("loss_sum", 0.0) for r in ranks)
        st.batches = sum(r.get("batches", 0) for r in ranks)
        st.skipped = sum(r.get("skipped", 0) for r in ranks)
        st.skipped_keys = [k for r in ranks for k in r.get("skipped_keys", [])]
    log.warning(
        "resume: world size %s → %d — continuing at sample %d of epoch %d's permutation (step %d of "
        "%d, was step %d); data order is exact, the per-rank RNG streams (dropout) restart",
        saved_world,
        world,
        st.step_in_epoch * world * cfg.data.batch_size * cfg.train.grad_accum_steps,
        st.epoch + 1,
        st.step_in_epoch,
        steps_per_epoch,
        old_step,
    )


def remap_position(
    cfg: Config,
    state: dict,
    world: int,
    steps_per_epoch: int,
    st: TrainState,
    path: Path,
    scheduler,
    optimizer,
    per_step_schedule: bool,
) -> None:
    """Same world size, but a step now takes another number of samples (checkpoint.force_resume
    with data.batch_size or train.grad_accum_steps changed): continue at the same sample of the
    epoch's permutation, as a world-size change does, and say so; a position between two of the
    new steps goes back to the step before it (those samples are seen again, counted in the line)."""
    samples = (state.get("loader") or {}).get("samples")
    per_step = cfg.data.batch_size * cfg.train.grad_accum_steps * world
    if samples is None or samples == st.step_in_epoch * per_step:
        return
    old_step = st.step_in_epoch
    st.step_in_epoch = min(samples // per_step, steps_per_epoch)
    again = samples - st.step_in_epoch * per_step
    if per_step_schedule and scheduler is not None:
        realign_schedule(scheduler, optimizer, st.epoch * steps_per_epoch + st.step_in_epoch)
    log.warning(
        "resume: a step now takes %d samples (data.batch_size × train.grad_accum_steps × %d rank(s)), "
        "%s was saved %d samples into epoch %d at step %d — continuing at step %d of %d (sample %d)%s",
        per_step,
        world,
        path,
        samples,
        st.epoch + 1,
        old_step,
        st.step_in_epoch,
        steps_per_epoch,
        st.step_in_epoch * per_step,
        f"; {again} samples are seen again" if again else "",
    )


def resume_step(cfg: Config, state: dict, world: int, steps_per_epoch: int, path: Path) -> int:
    """The step in the epoch at which ``world`` ranks continue the samples consumed by the saved run."""
    saved_world = state.get("world_size") or 1
    loader = state.get("loader") or {}
    st = state["loop"]
    samples = loader.get("samples")
    if samples is None:  # checkpoints before samples were stored: micro-batches × batch × ranks
        samples = (
            loader.get("skip_batches", st["step_in_epoch"] * cfg.train.grad_accum_steps)
            * cfg.data.batch_size
            * saved_world
        )
    per_step = cfg.data.batch_size * cfg.train.grad_accum_steps * world
    if samples % per_step:
        raise CxrError(
            f"{path}: saved by {saved_world} rank(s) {samples} samples into epoch {st['epoch'] + 1}; "
            f"with {world} rank(s) a step takes {per_step} samples (data.batch_size × "
            f"train.grad_accum_steps × ranks), which does not divide {samples} — resume with "
            f"{saved_world} rank(s), or with a number of ranks for which it does"
        )
    return min(samples // per_step, steps_per_epoch)


# ----------------------------------------------------------------------------- save
def checkpoint_meta(cfg: Config, st: TrainState, val: dict | None = None) -> dict:
    """meta.json of a checkpoint (docs/run-dir.md)."""
    return {
        "epoch": st.epoch,
        "step_in_epoch": st.step_in_epoch,
        "global_step": st.global_step,
        "config_hash": config_hash(cfg),
        "labels": label_names(cfg),
        "resolution": cfg.data.resolution,
        "model": cfg.model.kwargs(),
        "init_from": cfg.model.init_from,
        "finished": st.finished,
        "best_epoch": st.best_epoch,
        "images": image_source(cfg.data.shards, cfg.data.resolution),
        "data": data_identity(cfg),
        "val": {k: v for k, v in (val or {}).items() if k.startswith("val_")},
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_last(
    cfg: Config, accelerator: Accelerator, run_dir: Path, model, optimizer, scheduler, st: TrainState, loader
) -> None:
    """Write ``last`` (collective). ``loader``: the train loader when saving mid-epoch."""
    per_rank = st.sums()
    if loader is not None:
        report = loader.report()
        per_rank.update(
            skipped=st.skipped + report["skipped"], skipped_keys=st.skipped_keys + list(report["skipped_keys"])
        )
    state = {
        "loop": st.loop(),
        "lrs": [g["lr"] for g in optimizer.param_groups],
        "loader": {
            "epoch": st.epoch,
            "skip_batches": st.step_in_epoch * cfg.train.grad_accum_steps,
            # the position in the epoch's permutation: what a resume at any world size continues
            "samples": st.step_in_epoch * cfg.train.grad_accum_steps * cfg.data.batch_size * accelerator.num_processes,
        },
    }
    last_val = {f"val_{k[4:]}": v for k, v in (st.rows[-1] if st.rows else {}).items() if k.startswith("val_")}
    ckpt.save_checkpoint(
        accelerator,
        run_dir,
        "last",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        per_rank=per_rank,
        meta=checkpoint_meta(cfg, st, last_val),
    )


def save_best(cfg: Config, accelerator: Accelerator, run_dir: Path, model, st: TrainState, val: dict) -> None:
    """Write ``best`` (weights + meta, collective) and, on rank 0, the val predictions of this epoch."""
    ckpt.save_checkpoint(accelerator, run_dir, "best", model=model, meta=checkpoint_meta(cfg, st, val))
    if accelerator.is_main_process:  # columns "0", "1"... when not one per label: ood_ae's one score
        write_val_predictions(run_dir, val["keys"], val["probs"], label_names(cfg))
