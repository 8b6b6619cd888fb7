"""A training's way in and out of checkpoints (cxr/training/trainer.py; docs/run-dir.md
"Resume and requeue"): which checkpoint a run continues from, restoring it into a
:class:`~cxr.training.trainer.Trainer` (also at another world size), continuing a finished run,
and saving its ``last`` / ``best``. The loop state is cxr/training/state.py's; the checkpoint
files themselves are cxr/runs/checkpoint.py's."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from cxr.config import Config, config_diff, config_hash, hashed_dict, load_config
from cxr.data import image_source
from cxr.evaluation.predictions import write_val_predictions
from cxr.runs import checkpoint as ckpt
from cxr.training.setup import current_lr, label_names
from cxr.training.state import TrainerLike, TrainState
from cxrbase.errors import CxrError

log = logging.getLogger("cxr.train")
# keys whose change still continues a run exactly: a longer (or shorter) run of the same trajectory
EXTENDABLE = {"train.epochs", "train.max_steps"}


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


def continue_finished_run(trainer: TrainerLike, changed: list[str]) -> None:
    """A finished run resumed with more epochs (or steps): un-finish it when there is work left."""
    cfg, st, scheduler, optimizer = trainer.cfg, trainer.state, trainer.scheduler, trainer.optimizer
    if st.epoch >= cfg.train.epochs or st.out_of_steps(cfg):
        return
    st.finished = False
    per_step = trainer.per_step_schedule
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
def restore(trainer: TrainerLike, path: Path) -> None:
    """Load ``path`` into the trainer's prepared model, optimizer and scheduler and its state
    (loop state and this rank's sums).

    With another world size the position in the epoch's permutation (samples consumed) is kept:
    the step in the epoch is recomputed for the new global batch, and the running sums of all
    saved ranks go to rank 0 (the epoch's mean loss stays that of the same samples)."""
    cfg, accelerator, optimizer, st = trainer.cfg, trainer.accelerator, trainer.optimizer, trainer.state
    saved = ckpt.load_checkpoint(
        accelerator, path, model=trainer.model, optimizer=optimizer, scheduler=trainer.scheduler
    )
    for group, lr in zip(optimizer.param_groups, saved["lrs"]):
        group["lr"] = lr
    vars(st).update(TrainState.from_loop(saved["loop"]).loop_fields())
    if saved["rank"] is not None:
        for key, value in saved["rank"].items():
            if key != "rng":
                setattr(st, key, value)
        if not st.awaiting_validation:
            remap_position(trainer, saved, path)
        return
    saved_world, world, steps_per_epoch = saved.get("world_size"), accelerator.num_processes, trainer.steps_per_epoch
    old_step = st.step_in_epoch
    st.step_in_epoch = (
        steps_per_epoch if st.awaiting_validation else resume_step(cfg, saved, world, steps_per_epoch, path)
    )
    realign_per_step_schedule(trainer)
    if accelerator.is_main_process:
        ranks = saved["ranks"]
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


def realign_per_step_schedule(trainer: TrainerLike) -> None:
    """A per-step schedule to the trainer's position (after the step in the epoch was recomputed)."""
    if trainer.per_step_schedule and trainer.scheduler is not None:
        st = trainer.state
        realign_schedule(trainer.scheduler, trainer.optimizer, st.epoch * trainer.steps_per_epoch + st.step_in_epoch)


def remap_position(trainer: TrainerLike, saved: dict, path: Path) -> None:
    """Same world size, but a step now takes another number of samples (checkpoint.force_resume
    with data.batch_size or train.grad_accum_steps changed): continue at the same sample of the
    epoch's permutation, as a world-size change does, and say so; a position between two of the
    new steps goes back to the step before it (those samples are seen again, counted in the line)."""
    cfg, st, world, steps_per_epoch = trainer.cfg, trainer.state, trainer.world, trainer.steps_per_epoch
    samples = (saved.get("loader") or {}).get("samples")
    per_step = cfg.data.batch_size * cfg.train.grad_accum_steps * world
    if samples is None or samples == st.step_in_epoch * per_step:
        return
    old_step = st.step_in_epoch
    st.step_in_epoch = min(samples // per_step, steps_per_epoch)
    again = samples - st.step_in_epoch * per_step
    realign_per_step_schedule(trainer)
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


def save_last(trainer: TrainerLike, loader=None) -> None:
    """Write the trainer's ``last`` (collective) with its state as it is. ``loader``: the train
    loader when saving mid-epoch (its skipped samples so far go into this rank's sums)."""
    cfg, st, optimizer = trainer.cfg, trainer.state, trainer.optimizer
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
            "samples": st.step_in_epoch * cfg.train.grad_accum_steps * cfg.data.batch_size * trainer.world,
        },
    }
    last_val = {f"val_{k[4:]}": v for k, v in (st.rows[-1] if st.rows else {}).items() if k.startswith("val_")}
    ckpt.save_checkpoint(
        trainer.accelerator,
        trainer.run_dir,
        "last",
        model=trainer.model,
        optimizer=optimizer,
        scheduler=trainer.scheduler,
        state=state,
        per_rank=per_rank,
        meta=checkpoint_meta(cfg, st, last_val),
    )


def save_best(trainer: TrainerLike, val: dict) -> None:
    """Write the trainer's ``best`` (weights + meta, collective) and, on rank 0, the val
    predictions of this epoch."""
    cfg, accelerator = trainer.cfg, trainer.accelerator
    meta = checkpoint_meta(cfg, trainer.state, val)
    ckpt.save_checkpoint(accelerator, trainer.run_dir, "best", model=trainer.model, meta=meta)
    if accelerator.is_main_process:  # columns "0", "1"... when not one per label: ood_ae's one score
        write_val_predictions(trainer.run_dir, val["keys"], val["probs"], label_names(cfg))
