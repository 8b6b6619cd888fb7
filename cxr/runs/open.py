"""Opening a finished run: its typed config, best weights, model, and the loader that evaluates it.

The one way the evaluator, ablation, explain, embed, ood, export and predict turn a training run
dir into a model that scores batches: :func:`open_member` (``config.yaml`` read by its owner,
:meth:`cxr.config.Config.load`; ``checkpoints/best/model.safetensors`` loaded through
cxr.runs.checkpoint — tensors only, no pickled code; eval mode), :meth:`Member.loader_config`
(the run's ``data:`` section pointed at the shards to score, eval mode) and :func:`feed` (a batch
on the device into any model: metadata when the model takes it, the run's normalisation).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cxr.config import Config, config_to_dict
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS


@dataclass(frozen=True)
class EvalOptions:
    """How to read a split to evaluate runs on (the evaluator's, ablation's, explain's and embed's flags).

    ``None`` keeps the run's own setting (its ``data:`` section; ``resolution``: the members' training
    resolution)."""

    shards: str
    resolution: int | None = None
    backend: str | None = None
    batch_size: int | None = None
    num_threads: int | None = None
    loader_device: str | None = None
    precision: str = "fp32"
    cpu: bool = False

    @classmethod
    def from_flags(cls, flags: Any) -> EvalOptions:
        """From a command's parsed flags (``--shards``, ``--resolution``, ``--backend``, …): each field
        its flag's value where the command has that flag, else the field's default."""
        values = {f.name: getattr(flags, f.name) for f in fields(cls) if hasattr(flags, f.name)}
        return cls(**{**values, "shards": str(flags.shards)})


@dataclass
class Member:
    """One trained run to evaluate: its identity, typed config, best-checkpoint meta and (once opened) model."""

    name: str
    run_dir: Path
    config: Config
    meta: dict[str, Any]
    labels: list[str]
    resolution: int | None
    checkpoint: Path
    model: Any = None

    @property
    def uses_meta(self) -> bool:
        """Whether the model fuses patient metadata (the built model's own answer once opened)."""
        return takes_meta(self.model) if self.model is not None else self.config.model.metadata != "none"

    def loader_config(self, opts: EvalOptions, resolution: int, on_gpu: bool = False) -> Any:
        """The loader config that evaluates this run: its ``data:`` section pointed at ``opts.shards``,
        eval mode. A member trained with GPU decoding is evaluated with CPU decoding when this job has no GPU."""
        change: dict[str, Any] = {"shards": str(opts.shards), "resolution": resolution, "augment": False}
        if opts.backend:
            change["backend"] = opts.backend
        if opts.batch_size:
            change["eval_batch_size"] = opts.batch_size
        if opts.num_threads:
            change["num_threads"] = opts.num_threads
        if opts.loader_device:
            change["device"] = opts.loader_device
        elif self.config.data.device == "gpu" and not on_gpu:
            print("note: data.device=gpu in the run config but this job runs on CPU — decoding on CPU", file=sys.stderr)
            change["device"] = "cpu"
        return dataclasses.replace(self.config.data, **change)


def run_shards(run_dir: str | Path) -> str:
    """The shards folder a run trained on (its config.yaml's data.shards): the evaluators' default."""
    shards = Config.load(run_dir).data.shards
    if not shards:
        raise CxrError(f"{Path(run_dir) / 'config.yaml'}: no data.shards — give --shards")
    return str(shards)


def read_member(run_dir: str | Path, name: str | None = None) -> Member:
    """A run dir's typed config, best-checkpoint meta and label set/resolution (no weights yet)."""
    from cxr.runs.checkpoint import best_weights, read_meta

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CxrError(f"{run_dir}: run dir not found — pass training run dirs to --runs")
    config = Config.load(run_dir)
    checkpoint = best_weights(run_dir)
    meta = read_meta(checkpoint.parent)
    labels = meta.get("labels")
    if labels is None:
        num = config.model.num_labels
        labels = list(LABELS) if num == len(LABELS) else [f"label_{i}" for i in range(num)]
    resolution = meta.get("resolution") or config.data.resolution
    return Member(
        name=run_dir.resolve().name if name is None else name,
        run_dir=run_dir,
        config=config,
        meta=meta,
        labels=list(labels),
        resolution=int(resolution) if resolution else None,
        checkpoint=checkpoint,
    )


def build_member_model(member: Member, device: Any) -> Any:
    """Rebuild a member's model from its config, load its best weights, eval mode on ``device``."""
    from cxr.models import build_model
    from cxr.runs.checkpoint import load_weights

    kwargs = member.config.model.kwargs()  # without init_from: where training started, not a build argument
    name = kwargs.pop("name")
    # Evaluation never needs the backbone's pretrained file nor activation checkpointing.
    kwargs.update(pretrained=None, grad_checkpointing=False)
    try:
        model = build_model(name, **kwargs)
    except CxrError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise CxrError(
            f"{member.run_dir}/config.yaml: cannot rebuild model {name!r} ({err}) — "
            "the config's model: section must match cxr.models.build_model"
        ) from err
    load_weights(
        model,
        member.checkpoint.parent,
        fix=f"was {member.run_dir}/config.yaml edited after training? restore the one it was trained with",
        corrupt_fix=f"only tensors are loaded, never pickled code; retrain run {member.run_dir} "
        "or restore its checkpoints/best",
    )
    return model.to(device).eval()


def open_member(
    run_dir: str | Path, name: str | None = None, device: Any = "cpu", check: Callable[[Member], None] | None = None
) -> Member:
    """A run dir opened for scoring: :func:`read_member` with its model built, weights loaded, eval mode.

    ``check(member)``, if given, runs before the weights are loaded: a tool refuses a run it cannot use
    (wrong kind, metadata, labels) with its own message rather than a weights mismatch."""
    import torch

    member = read_member(run_dir, name)
    if check is not None:
        check(member)
    member.model = build_member_model(member, torch.device(device))
    return member


def check_distinct(run_dirs: Sequence[str | Path]) -> None:
    """Refuse a run given twice (by any path: symlinks, ``..``, a trailing slash): the ensemble
    would count it twice."""
    seen: dict[str, str] = {}
    for run_dir in run_dirs:
        real = os.path.realpath(run_dir)
        if real in seen:
            same = f"{seen[real]} and {run_dir}" + (f" are both {real}" if seen[real] != str(run_dir) else " again")
            raise CxrError(
                f"{run_dir}: run given twice to --runs ({same}) — an ensemble would count it twice; pass each run once"
            )
        seen[real] = str(run_dir)


# ------------------------------------------------------------------ feeding a batch ----


def takes_meta(model: Any) -> bool:
    """Whether ``model`` fuses patient metadata (the suite's models say so; others, e.g. the OOD AE, do not)."""
    return bool(getattr(model, "uses_meta", False))


def on_device(batch: Mapping[str, Any], device: Any) -> tuple[Any, Any]:
    """(image, meta or None) of a loader batch on ``device`` (non_blocking: overlaps the previous step on GPU);
    the image normalised float32 by :func:`cxr.data.batch.to_device` from the uint8 the loader handed over."""
    from cxr.data.batch import to_device

    image = to_device(batch, device)
    meta = batch["meta"].to(device, non_blocking=True) if "meta" in batch else None
    return image, meta


def feed(model: Any, image: Any, meta: Any = None, renorm: Callable[[Any], Any] | None = None, call: str = "") -> Any:
    """``model`` (or its method ``call``, e.g. ``pooled``) on ``renorm(image)``, with ``meta`` when the model
    takes metadata. Memory format is the model's own business (``channels_last`` models convert their input)."""
    x = image if renorm is None else renorm(image)
    fn = getattr(model, call) if call else model
    return fn(x, meta=meta if takes_meta(model) else None)


def renormaliser(member: Member, loader_cfg: Any, device: Any) -> Callable[[Any], Any]:
    """Map images normalised by ``loader_cfg`` to this member's training normalisation (identity if equal)."""
    import numpy as np
    import torch

    src, own = loader_cfg, member.config.data
    if np.allclose(own.mean, src.mean) and np.allclose(own.std, src.std):
        return lambda x: x

    def as4d(v: Any) -> Any:
        return torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)

    a, b = as4d(src.std) / as4d(own.std), (as4d(src.mean) - as4d(own.mean)) / as4d(own.std)
    return lambda x: x * a + b


# ------------------------------------------------------------------ members.json ----


def member_info(member: Member, eval_resolution: int) -> dict[str, Any]:
    """The run-config summary of one member for members.json and the report."""
    cfg = member.config
    return {
        "name": member.name,
        "run_dir": str(member.run_dir),
        "checkpoint": str(member.checkpoint),
        "model": cfg.model.name,
        "model_options": _non_default_options(config_to_dict(cfg)["model"]),
        "loss": cfg.loss.name,
        "lr": cfg.optim.lr,
        "seed": cfg.train.seed,
        "train_resolution": member.resolution,
        "eval_resolution": eval_resolution,
        "best_epoch": member.meta.get("epoch"),
        "best_val": _headline_val(member.meta.get("val")),
        "run_status": run_status(member.run_dir),
    }


def run_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's state when evaluated (RUN/status.json via cxr.runs.run_log: finished | preempted |
    failed | running), so an unfinished member is named in members.json and report.md; None
    for a run dir without one (assembled by hand)."""
    from cxr.runs.run_log import read_status

    status = read_status(run_dir)
    if not isinstance(status, dict):
        return None
    return {k: status.get(k) for k in ("state", "epoch", "global_step", "time")}


def _non_default_options(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The model options that differ from build_model's defaults (what tells members apart)."""
    import inspect

    from cxr.models import build_model

    defaults = {
        k: p.default
        for k, p in inspect.signature(build_model).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {k: v for k, v in model_cfg.items() if k != "name" and (k not in defaults or defaults[k] != v)}


def _headline_val(val: Any) -> Any:
    """The best checkpoint's validation loss and mean AUROC (meta.json keeps every metric)."""
    if not isinstance(val, dict):
        return val
    keep = ("val_loss", "loss", "val_mean_auroc", "mean_auroc")
    return {k: val[k] for k in keep if k in val} or val
