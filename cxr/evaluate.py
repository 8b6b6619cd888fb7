"""`python -m cxr.evaluate` — infer trained members on a split, ensemble them, report.

    python -m cxr.evaluate --runs RUN [RUN ...] --shards DIR --split test --out REPORT
    accelerate launch [--multi_gpu --num_processes N] -m cxr.evaluate ...   # distributed
    python -m cxr.evaluate --from-predictions REPORT/predictions.parquet --out REPORT2

A separate job from training that never trains: every member is rebuilt from its
run's ``config.yaml`` (``model:`` → ``build_model``), loads ``checkpoints/best``
without unpickling code, and runs in eval mode under ``torch.inference_mode``. The
split is read once and every member scores each batch. Under a launcher each rank
infers a disjoint part of the split; keys and probabilities are gathered on rank 0,
which checks that every image of the split was scored exactly once and writes
(atomically) ``predictions.parquet``, ``aucs.csv``, ``thresholds.json``,
``metrics.csv``, ``members.json``, ``roc.png``, ``pr.png`` and ``report.md``.

predictions.parquet is long: one row per (split, member, key) with one probability column per label
(the shards' label names: the 14 NIH ones or a generic table's, float64) and the ground-truth columns ``true_<Label>``
(0/1); the ensemble is member ``ensemble``; both the evaluated split and the threshold
split are in it, so ``--from-predictions`` needs nothing else. The ensemble is always
recomputed from the member rows (``--ensemble``), in both modes, so a re-analysis
reproduces the tables exactly.

Resolution policy: all members must share the shards' label set, else they are
refused. Each member is inferred at its own training resolution: members are grouped
by resolution and the split is read once per distinct resolution (the loader decodes
and resizes each image to that resolution, with the same filter as training used),
then the groups' scores are joined by key. One pass per resolution, not one decode
resized per member, because it reuses the training loaders unchanged (derived
``resN/`` shards where packed, so high resolutions never decode the 1024² masters
twice) and every member sees exactly the pixels it was trained on; the extra decodes
cost a few passes at the lower resolutions, which are the cheap ones. ``--resolution R``
instead evaluates every member at R×R (the suite's models take any input size); the
report lists each member's training resolution next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cxr.report import ENSEMBLE, ScoreSet
from shards.atomic import atomic_write, atomic_write_text
from shards.errors import CxrError, cli_entry
from shards.labels import LABELS

TRUE_PREFIX = "true_"  # ground-truth columns in predictions.parquet: true_<Label> (0/1)
PREDICTION_COLUMNS = ["key", "split", "member", *LABELS, *(TRUE_PREFIX + label for label in LABELS)]  # NIH shards


def prediction_columns(labels: Sequence[str]) -> list[str]:
    """The columns of predictions.parquet for a label set (PREDICTION_COLUMNS for the 14 NIH labels)."""
    return ["key", "split", "member", *labels, *(TRUE_PREFIX + label for label in labels)]
CHECKPOINT_FILES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")


# ---------------------------------------------------------------- members ----

@dataclass
class Member:
    """One trained run to evaluate: its identity, saved config and (once loaded) model."""

    name: str
    run_dir: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    labels: list[str]
    resolution: int | None
    checkpoint: Path
    model: Any = None
    mean: Any = None
    std: Any = None
    uses_meta: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise CxrError(f"{path}: run config not found — is {path.parent} a training run dir "
                       "(docs/run-dir.md)?")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CxrError(f"{path}: unreadable YAML ({err}) — restore the run's config.yaml") from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CxrError(f"{path}: no `model:` section — the evaluator rebuilds the model from it; "
                       "restore the run's resolved config.yaml")
    return config


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CxrError(f"{path}: corrupt checkpoint meta ({err}) — re-export the best checkpoint") from err


def find_checkpoint(run_dir: Path) -> Path:
    """The weights file of a run's best checkpoint (safetensors preferred)."""
    best = run_dir / "checkpoints" / "best"
    # best.old holds the previous best only if training died between the two renames of a save.
    for folder in (best, best.with_name("best.old")):
        for name in CHECKPOINT_FILES:
            if (folder / name).is_file():
                return folder / name
    raise CxrError(f"{best / CHECKPOINT_FILES[0]}: run {run_dir} has no best checkpoint — "
                   "train it to completion (or copy checkpoints/last to checkpoints/best)")


def read_member(run_dir: str | Path, name: str) -> Member:
    """Read a run dir's config, best-checkpoint meta and label set/resolution (no weights yet)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CxrError(f"{run_dir}: run dir not found — pass training run dirs to --runs")
    config = _read_yaml(run_dir / "config.yaml")
    checkpoint = find_checkpoint(run_dir)
    meta = _read_meta(checkpoint.parent / "meta.json")
    model_cfg = config["model"]
    labels = meta.get("labels") or config.get("data", {}).get("labels")
    if labels is None:
        num = int(model_cfg.get("num_labels", len(LABELS)))
        labels = list(LABELS) if num == len(LABELS) else [f"label_{i}" for i in range(num)]
    resolution = meta.get("resolution") or config.get("data", {}).get("resolution")
    data_cfg = config.get("data", {})
    return Member(
        name=name, run_dir=run_dir, config=config, meta=meta, labels=list(labels),
        resolution=int(resolution) if resolution else None, checkpoint=checkpoint,
        mean=data_cfg.get("mean"), std=data_cfg.get("std"),
        uses_meta=str(model_cfg.get("metadata", "none")) != "none",
    )


def member_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Unique, readable member names: the run dir's name, suffixed when two collide."""
    names: list[str] = []
    for run_dir in run_dirs:
        base = Path(run_dir).resolve().name or "run"
        base = f"{base}_member" if base == ENSEMBLE else base
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def check_compatible(members: Sequence[Member], labels: Sequence[str],
                     resolution: int | None) -> int | None:
    """Refuse members whose label set differs; return the eval resolution (None: each member's own).

    ``labels`` is the shards' label set; ``resolution`` the user's ``--resolution`` (None:
    the members' shared training resolution, or None when they differ).
    """
    for m in members:
        if list(m.labels) != list(labels):
            raise CxrError(
                f"{m.run_dir}: member {m.name} was trained on {len(m.labels)} labels {m.labels[:3]}… "
                f"but the shards have {len(labels)} labels {list(labels)[:3]}… — an ensemble needs one "
                "label set; evaluate this run on shards with its labels, or leave it out")
    if resolution is not None:
        return int(resolution)
    first = members[0]
    if first.resolution is None:
        raise CxrError(f"{first.run_dir}/config.yaml: no data.resolution — pass --resolution")
    for m in members[1:]:
        if m.resolution is None:
            raise CxrError(f"{m.run_dir}/config.yaml: no data.resolution — pass --resolution")
        if m.resolution != first.resolution:
            return None  # mixed: each member at its own training resolution (infer_runs)
    return int(first.resolution)


def load_state_dict(member: Member) -> dict[str, Any]:
    """Read a checkpoint's tensors without executing code: safetensors, or weights-only torch.load."""
    import torch

    path = member.checkpoint
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any parse failure means the file is unusable
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CxrError(
            f"{path}: run {member.run_dir}: checkpoint is corrupt or not weights-only ({reason[:200]}) "
            "— only tensors are loaded, never pickled code; re-save it with safetensors") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CxrError(f"{path}: run {member.run_dir}: not a flat tensor state dict — re-save the "
                       "unwrapped model's state_dict")
    # DDP / torch.compile wrappers prefix the parameter names; the model is rebuilt unwrapped.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def build_member_model(member: Member, device: Any) -> Any:
    """Rebuild a member's model from its config, load its best weights, eval mode on ``device``."""
    from cxr.models import build_model

    kwargs = dict(member.config["model"])
    kwargs.pop("init_from", None)  # where training started from: not a build_model argument
    name = kwargs.pop("name", None)
    if name is None:
        raise CxrError(f"{member.run_dir}/config.yaml: model.name missing — restore the run's config")
    # Evaluation never needs the backbone's pretrained file nor activation checkpointing.
    kwargs.update(pretrained=None, grad_checkpointing=False)
    try:
        model = build_model(name, **kwargs)
    except CxrError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise CxrError(f"{member.run_dir}/config.yaml: cannot rebuild model {name!r} ({err}) — "
                       "the config's model: section must match cxr.models.build_model") from err
    state = load_state_dict(member)
    missing, unexpected = _diff_keys(model.state_dict(), state)
    if missing or unexpected:
        raise CxrError(f"{member.checkpoint}: run {member.run_dir}: weights do not fit model {name!r} "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]}) — was config.yaml "
                       "edited after training?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CxrError(f"{member.checkpoint}: run {member.run_dir}: weights do not fit model "
                       f"{name!r} ({str(err).splitlines()[0]}) — was config.yaml edited?") from err
    member.uses_meta = bool(getattr(model, "uses_meta", member.uses_meta))
    return model.to(device).eval()


def _diff_keys(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def member_info(member: Member, eval_resolution: int) -> dict[str, Any]:
    """The run-config summary of one member for members.json and the report."""
    cfg = member.config
    model_cfg = dict(cfg.get("model", {}))
    loss = cfg.get("loss", {})
    optim = cfg.get("optim", {})
    return {
        "name": member.name,
        "run_dir": str(member.run_dir),
        "checkpoint": str(member.checkpoint),
        "model": model_cfg.get("name"),
        "model_options": _non_default_options(model_cfg),
        "loss": loss.get("name", loss.get("kind")) if isinstance(loss, dict) else loss,
        "lr": optim.get("lr") if isinstance(optim, dict) else None,
        "seed": (cfg.get("train") or {}).get("seed") if isinstance(cfg.get("train"), dict) else None,
        "train_resolution": member.resolution,
        "eval_resolution": eval_resolution,
        "best_epoch": member.meta.get("epoch"),
        "best_val": _headline_val(member.meta.get("val")),
    }


def _non_default_options(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The model options that differ from build_model's defaults (what tells members apart)."""
    import inspect

    from cxr.models import build_model

    defaults = {k: p.default for k, p in inspect.signature(build_model).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {k: v for k, v in model_cfg.items() if k != "name" and (k not in defaults or defaults[k] != v)}


def _headline_val(val: Any) -> Any:
    """The best checkpoint's validation loss and mean AUROC (meta.json keeps every metric)."""
    if not isinstance(val, dict):
        return val
    keep = ("val_loss", "loss", "val_mean_auroc", "mean_auroc")
    return {k: val[k] for k in keep if k in val} or val


# -------------------------------------------------------------- inference ----

def eval_data_config(members: Sequence[Member], args: argparse.Namespace, resolution: int,
                     on_gpu: bool = False) -> Any:
    """The loader config: the first member's ``data:`` section, pointed at --shards, eval mode.

    A member trained with GPU decoding is evaluated with CPU decoding when this job has no GPU.
    """
    from cxr.data import DataConfig

    known = {f.name for f in dataclasses.fields(DataConfig)}
    kwargs = {k: v for k, v in (members[0].config.get("data") or {}).items() if k in known}
    kwargs.update(shards=str(args.shards), resolution=resolution, augment=False)
    if args.backend:
        kwargs["backend"] = args.backend
    if args.batch_size:
        kwargs["eval_batch_size"] = args.batch_size
        kwargs.setdefault("batch_size", args.batch_size)
    if args.num_threads:
        kwargs["num_threads"] = args.num_threads
    if args.loader_device:
        kwargs["device"] = args.loader_device
    elif kwargs.get("device") == "gpu" and not on_gpu:
        print("note: data.device=gpu in the run config but this job runs on CPU — decoding on CPU",
              file=sys.stderr)
        kwargs["device"] = "cpu"
    return DataConfig(**kwargs)


def _renormaliser(member: Member, loader_cfg: Any, device: Any):
    """Map loader-normalised images to this member's training normalisation (identity if equal)."""
    import torch

    src_mean, src_std = getattr(loader_cfg, "mean", None), getattr(loader_cfg, "std", None)
    mean = src_mean if member.mean is None else member.mean
    std = src_std if member.std is None else member.std
    if src_mean is None or (np.allclose(mean, src_mean) and np.allclose(std, src_std)):
        return lambda x: x

    def as4d(v: Any) -> Any:
        return torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)

    a, b = as4d(src_std) / as4d(std), (as4d(src_mean) - as4d(mean)) / as4d(std)
    return lambda x: x * a + b


def infer_split(members: Sequence[Member], loader_cfg: Any, split: str, state: Any,
                precision: str = "fp32") -> ScoreSet:
    """Score this rank's share of ``split`` with every member (one read of the data)."""
    import torch
    from tqdm import tqdm

    from cxr.data import build_loader
    device = state.device
    loader = build_loader(loader_cfg, split, rank=state.process_index,
                          world_size=state.num_processes, epoch=0, train=False)
    renorm = {m.name: _renormaliser(m, loader_cfg, device) for m in members}
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    keys: list[str] = []
    truth: list[np.ndarray] = []
    probs: dict[str, list[np.ndarray]] = {m.name: [] for m in members}
    try:
        total = len(loader)
    except TypeError:
        total = None
    bar = tqdm(loader, total=total, desc=f"infer {split}", unit="batch",
               disable=not state.is_main_process, dynamic_ncols=True)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                enabled=dtype is not None):
        for batch in bar:
            image = batch["image"].to(device, non_blocking=True)
            meta = batch["meta"].to(device, non_blocking=True) if "meta" in batch else None
            for m in members:
                logits = m.model(renorm[m.name](image), meta=meta if m.uses_meta else None)
                # float64 sigmoid keeps logits up to ~37 distinguishable (mean-logit ensembles).
                probs[m.name].append(torch.sigmoid(logits.double()).cpu().numpy())
            keys.extend(str(k) for k in batch["key"])
            truth.append(batch["labels"].cpu().numpy().round().astype(np.uint8))
    n_labels = len(members[0].labels)
    return ScoreSet(
        keys=np.asarray(keys, dtype=object),
        y_true=np.concatenate(truth) if truth else np.zeros((0, n_labels), np.uint8),
        scores={k: np.concatenate(v) if v else np.zeros((0, n_labels)) for k, v in probs.items()},
        labels=tuple(members[0].labels),
    )


def gather_scores(local: ScoreSet, state: Any) -> ScoreSet | None:
    """Collect every rank's scores on rank 0 (others get None), deduplicated and sorted by key."""
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    else:
        parts = [local]
    if not state.is_main_process:
        return None
    merged = ScoreSet(
        keys=np.concatenate([p.keys for p in parts]),
        y_true=np.concatenate([p.y_true for p in parts]),
        scores={name: np.concatenate([p.scores[name] for p in parts]) for name in local.scores},
        labels=local.labels,
    )
    return merged.deduplicated()


def join_members(parts: Sequence[ScoreSet | None], order: Sequence[str], shards: Path,
                 split: str) -> ScoreSet | None:
    """Join per-resolution passes (each sorted by key) into one ScoreSet, members in ``order``."""
    if parts[0] is None:  # not rank 0
        return None
    first = parts[0]
    for part in parts[1:]:
        if not np.array_equal(part.keys, first.keys) or not np.array_equal(part.y_true, first.y_true):
            raise CxrError(f"{shards}: split {split!r} gave different images or labels at two "
                           "resolutions — the derived resN/ shards must hold the masters' samples; "
                           "re-run `python -m shards pack --resize`")
    scores = {k: v for part in parts for k, v in part.scores.items()}
    return dataclasses.replace(first, scores={name: scores[name] for name in order},
                               duplicates=max(p.duplicates for p in parts))


def expected_keys(shards: Path, split: str, if_empty: str = "use --thresholds-from none"
                  ) -> tuple[int, set[str] | None]:
    """The number of samples of ``split`` in the manifest and, if its splits table is at hand, their keys."""
    manifest_path = shards / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CxrError(f"{manifest_path}: unreadable shards manifest ({err}) — point --shards at "
                       "a folder written by `python -m shards pack`") from err
    splits = manifest.get("splits", {})
    if split not in splits:
        raise CxrError(f"{manifest_path}: no split {split!r} (has {sorted(splits)}) — choose --split "
                       "/ --thresholds-from among those")
    count = int(splits[split].get("samples", 0) or 0)
    if count == 0:
        raise CxrError(f"{manifest_path}: split {split!r} has no samples — {if_empty} "
                       f"(splits with samples: {sorted(s for s in splits if splits[s].get('samples'))})")
    table = manifest.get("splits_file")
    table_path = (shards / table) if table and not Path(table).is_absolute() else Path(table or "")
    if not table or not table_path.is_file():
        return count, None
    frame = pd.read_parquet(table_path) if table_path.suffix == ".parquet" else pd.read_csv(table_path)
    if not {"image", "split"} <= set(frame.columns):
        return count, None
    keys = {Path(str(i)).stem for i in frame.loc[frame["split"] == split, "image"]}
    dropped = set(manifest.get("missing", [])) | {r.get("image") for r in manifest.get("rejected", [])}
    return count, {Path(str(k)).stem for k in keys - dropped}


def check_coverage(scores: ScoreSet, shards: Path, split: str) -> None:
    """Every image of the split scored exactly once: else raise naming what is missing/extra."""
    count, keys = expected_keys(shards, split)
    got = set(scores.keys.tolist())
    if keys is not None and got != keys:
        missing, extra = sorted(keys - got), sorted(got - keys)
        raise CxrError(f"{shards}/manifest.json: split {split!r} has {len(keys)} images but "
                       f"{len(got)} were scored (missing {missing[:3]}, unexpected {extra[:3]}) — "
                       "the loader must deliver each sample once across ranks; re-pack or --debug")
    if len(got) != count:
        raise CxrError(f"{shards}/manifest.json: split {split!r} has {count} samples but {len(got)} "
                       "distinct images were scored — the loader must deliver each sample once "
                       "across ranks; check the shards with `python -m shards verify`")


# ---------------------------------------------------------------- ensemble ---

def ensemble_scores(scores: dict[str, np.ndarray], method: str = "mean-prob") -> np.ndarray:
    """The ensemble's probabilities [N, L]: mean of member probabilities, or sigmoid of mean logits."""
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in scores.values()])
    if method == "mean-prob":
        return stack.mean(axis=0)
    if method == "mean-logit":
        from scipy.special import expit, logit

        # Clip so a saturated member (p == 0 or 1 in float64) stays finite.
        eps = 1e-15
        return expit(logit(np.clip(stack, eps, 1 - eps)).mean(axis=0))
    raise CxrError(f"--ensemble {method}: unknown method — use mean-prob or mean-logit")


def with_ensemble(scores: ScoreSet, method: str) -> ScoreSet:
    """A copy of ``scores`` with the ensemble (of all its members) added last."""
    members = {k: v for k, v in scores.scores.items() if k != ENSEMBLE}
    if not members:
        return scores
    return dataclasses.replace(scores, scores={**members, ENSEMBLE: ensemble_scores(members, method)})


# ------------------------------------------------------- predictions files ---

def predictions_frame(per_split: dict[str, ScoreSet]) -> pd.DataFrame:
    """The long table of predictions.parquet: one row per (split, member, key)."""
    frames = []
    for split, s in per_split.items():
        truth = pd.DataFrame(s.y_true.astype(np.uint8), columns=[TRUE_PREFIX + c for c in s.labels])
        for member, probs in s.scores.items():
            frame = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(s.labels))
            frame.insert(0, "member", member)
            frame.insert(0, "split", split)
            frame.insert(0, "key", s.keys.astype(str))
            frames.append(pd.concat([frame, truth], axis=1))
    return pd.concat(frames, ignore_index=True)[prediction_columns(next(iter(per_split.values())).labels)]


def check_values(where: str, split: str, member: str, keys: np.ndarray, values: np.ndarray,
                 kind: str, labels: Sequence[str] = LABELS) -> None:
    """Raise naming ``where``, split, member, first key and label when ``values`` [N, L] hold a
    NaN/inf or a value outside [0, 1] (kind="score") or other than 0/1 (kind="label")."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if kind == "label":
        bad |= (values != 0) & (values != 1)
    if not bad.any():
        return
    row, col = (int(i) for i in np.argwhere(bad)[0])
    what = ("scores must be probabilities in [0, 1]" if kind == "score" else "labels must be 0 or 1")
    fix = ("check the model outputs (a diverged member gives NaN)" if kind == "score"
           else "the ground truth comes from the shards' labels; re-run the evaluation")
    raise CxrError(f"{where}: split {split!r}, member {member!r}: {int(bad.sum())} bad values, first at key "
                   f"{keys[row]!r} label {labels[col]} = {float(values[row, col]):g} ({what}) — {fix}")


def check_score_sets(per_split: dict[str, ScoreSet], where: str) -> None:
    """Every score a probability and every label 0/1, before anything is written (see check_values)."""
    for split, s in per_split.items():
        check_values(where, split, "(ground truth)", s.keys, s.y_true, "label", s.labels)
        for member, probs in s.scores.items():
            check_values(where, split, member, s.keys, probs, "score", s.labels)


def read_predictions(path: Path) -> dict[str, ScoreSet]:
    """predictions.parquet → {split: ScoreSet} with members in file order, aligned by key."""
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 — pyarrow raises several types for a bad file
        raise CxrError(f"{path}: unreadable predictions ({err}) — pass a predictions.parquet "
                       "written by `python -m cxr.evaluate`") from err
    labels = [c[len(TRUE_PREFIX):] for c in frame.columns if str(c).startswith(TRUE_PREFIX)]
    missing = [c for c in prediction_columns(labels or LABELS) if c not in frame.columns]
    if missing:
        raise CxrError(f"{path}: missing columns {missing[:4]} — not a cxr.evaluate predictions file")
    out: dict[str, ScoreSet] = {}
    for split, part in frame.groupby("split", sort=False):
        members = list(dict.fromkeys(part["member"]))
        first = part[part["member"] == members[0]].sort_values("key")
        keys = first["key"].to_numpy(dtype=object)
        scores = {}
        for member in members:
            rows = part[part["member"] == member].sort_values("key")
            if not np.array_equal(rows["key"].to_numpy(dtype=object), keys):
                raise CxrError(f"{path}: split {split!r}: member {member!r} has a different key set "
                               f"than {members[0]!r} — the file was edited or merged wrongly")
            scores[member] = rows[labels].to_numpy(dtype=np.float64)
            check_values(str(path), str(split), member, keys, scores[member], "score", labels)
            check_values(str(path), str(split), member, keys,
                         rows[[TRUE_PREFIX + c for c in labels]].to_numpy(dtype=np.float64), "label", labels)
        y_true = first[[TRUE_PREFIX + c for c in labels]].to_numpy(dtype=np.uint8)
        out[str(split)] = ScoreSet(keys=keys, y_true=y_true, scores=scores, labels=tuple(labels))
    return out


# ------------------------------------------------------------ orchestration --

def _shards_labels(shards: Path) -> list[str]:
    path = shards / "manifest.json"
    if not path.is_file():
        raise CxrError(f"{path}: shards manifest not found — point --shards at a folder written by "
                       "`python -m shards pack`")
    try:
        return list(json.loads(path.read_text()).get("labels") or LABELS)
    except json.JSONDecodeError as err:
        raise CxrError(f"{path}: corrupt manifest ({err}) — re-run `python -m shards pack`") from err


def _state(args: argparse.Namespace) -> Any:
    """The launcher's process layout (1 process when started without a launcher)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=args.cpu or not torch.cuda.is_available())


def infer_runs(args: argparse.Namespace, state: Any, splits: Sequence[str]
               ) -> tuple[dict[str, ScoreSet] | None, list[dict[str, Any]]]:
    """Load every member, infer each split once across ranks; rank 0 gets {split: ScoreSet}."""
    shards = Path(args.shards)
    members = [read_member(r, n) for r, n in zip(args.runs, member_names(args.runs))]
    resolution = check_compatible(members, _shards_labels(shards), args.resolution)
    for m in members:
        m.model = build_member_model(m, state.device)
    groups: dict[int, list[Member]] = {}  # one pass over the split per distinct resolution
    for m in members:
        groups.setdefault(int(resolution or m.resolution), []).append(m)
    loader_cfgs = {res: eval_data_config(group, args, res, on_gpu=state.device.type == "cuda")
                   for res, group in groups.items()}
    per_split: dict[str, ScoreSet] = {}
    for split in splits:  # fail before any inference if a split does not exist or is empty
        expected_keys(shards, split, "choose another --split" if split == args.split else "use --thresholds-from none")
    for split in splits:
        parts = [gather_scores(infer_split(group, loader_cfgs[res], split, state, args.precision), state)
                 for res, group in groups.items()]
        merged = join_members(parts, [m.name for m in members], shards, split)
        if merged is not None:
            if merged.duplicates:
                print(f"note: split {split!r}: {merged.duplicates} duplicated keys across ranks dropped",
                      file=sys.stderr)
            check_coverage(merged, shards, split)
            per_split[split] = merged
    infos = [member_info(m, resolution or m.resolution) for m in members]
    return (per_split if state.is_main_process else None), infos


def load_saved(args: argparse.Namespace) -> tuple[dict[str, ScoreSet], list[dict[str, Any]]]:
    """--from-predictions: the saved scores and, if beside them, members.json."""
    path = Path(args.from_predictions)
    if not path.is_file():
        raise CxrError(f"{path}: predictions file not found — pass REPORT/predictions.parquet")
    per_split = read_predictions(path)
    members_json = path.parent / "members.json"
    infos = json.loads(members_json.read_text()) if members_json.is_file() else []
    return per_split, infos


def write_predictions(out: Path, per_split: dict[str, ScoreSet], infos: list[dict[str, Any]]) -> None:
    """predictions.parquet (all splits, members and ensemble) and members.json, atomically."""
    frame = predictions_frame(per_split)
    with atomic_write(out / "predictions.parquet", "wb") as fh:
        frame.to_parquet(fh, index=False)
    atomic_write_text(out / "members.json", json.dumps(infos, indent=2, default=str) + "\n")


def _splits_needed(args: argparse.Namespace) -> list[str]:
    thr = None if args.thresholds_from in (None, "none") else args.thresholds_from
    return [args.split] + ([thr] if thr and thr != args.split else [])


def _context(args: argparse.Namespace, source: str) -> dict[str, Any]:
    notes = []
    if args.thresholds_from == args.split:
        notes.append(f"thresholds were tuned on the evaluated split `{args.split}` itself: "
                     "the threshold metrics are optimistic")
    return {"ensemble": args.ensemble, "bootstrap": args.bootstrap, "seed": args.seed,
            "alpha": args.alpha, "thresholds_from": args.thresholds_from, "source": source,
            "notes": notes}


def analyse_and_write(args: argparse.Namespace, per_split: dict[str, ScoreSet],
                      infos: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """Ensemble, write predictions, compute every table and the report; return a summary."""
    from cxr.report import analyse, write_outputs

    out = Path(args.out)
    for split in _splits_needed(args):
        if split not in per_split:
            raise CxrError(f"{source}: no predictions for split {split!r} (has {sorted(per_split)}) — "
                           "choose --split/--thresholds-from among those, or --thresholds-from none")
    check_score_sets(per_split, source)  # freshly inferred scores too: nothing is written before this
    per_split = {k: with_ensemble(v, args.ensemble) for k, v in per_split.items()}
    write_predictions(out, per_split, infos)
    tuning_split = None if args.thresholds_from in (None, "none") else args.thresholds_from
    scores = per_split[args.split]
    t0 = time.perf_counter()
    analysis = analyse(scores, per_split.get(tuning_split) if tuning_split else None,
                       tuning_split=tuning_split, n_boot=args.bootstrap, seed=args.seed, alpha=args.alpha)
    seconds = {"analysis": time.perf_counter() - t0}
    seconds.update(write_outputs(out, analysis, scores, split=args.split, context=_context(args, source),
                                 members=infos, figures=not args.no_figures))
    return {"analysis": analysis, "scores": scores, "seconds": seconds}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cxr.evaluate",
        description="Evaluate trained runs (an ensemble of members) on a split of packed shards: "
        "per-label AUROC with bootstrap CIs, AUPRC, tuned thresholds, threshold metrics, ROC/PR "
        "figures and report.md. Never trains. Under `accelerate launch` each rank infers a "
        "disjoint part of the split and rank 0 writes the report.",
        epilog="Writes OUT/{predictions.parquet, members.json, aucs.csv, thresholds.json, metrics.csv, "
        "roc.png, pr.png, report.md}. Examples:\n"
        "  python -m cxr.evaluate --runs runs/m1 runs/m2 --shards shards --split test --out report\n"
        "  accelerate launch --multi_gpu --num_processes 4 -m cxr.evaluate --runs ... --out report\n"
        "  python -m cxr.evaluate --from-predictions report/predictions.parquet --out report2\n"
        "--debug shows the traceback of an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", metavar="RUN",
                   help="training run dirs (config.yaml + checkpoints/best); each is one member")
    p.add_argument("--shards", help="shards folder with manifest.json (python -m shards pack)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--thresholds-from", default="val",
                   help="split on which F1/Youden thresholds are tuned (inferred too); 'none': 0.5 only (default: val)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the AUROC CIs; 0: no CIs (default: 1000)")
    p.add_argument("--alpha", type=float, default=0.05, help="CI level is 1 - alpha (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default: 0)")
    p.add_argument("--ensemble", choices=["mean-prob", "mean-logit"], default="mean-prob",
                   help="ensemble = mean of member probabilities (default), or sigmoid of their mean logit")
    p.add_argument("--from-predictions", metavar="FILE",
                   help="recompute every output from a saved predictions.parquet (no models, no shards)")
    p.add_argument("--resolution", type=int, default=None,
                   help="evaluate every member at R×R even if trained at other resolutions "
                   "(default: members must share one training resolution, else refused)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch per rank "
                   "(default: the first member's data.eval_batch_size / batch_size)")
    p.add_argument("--backend", choices=["dali", "wds"], default=None,
                   help="loader back end (default: the first member's data.backend)")
    p.add_argument("--num-threads", type=int, default=None, help="loader threads/workers per rank (default: the first member's data.num_threads)")
    p.add_argument("--loader-device", choices=["cpu", "gpu"], default=None,
                   help="where the loader decodes (default: the first member's data.device)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype of the forward pass; bf16/fp16 for GPUs (default: fp32)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per process (default: torch's choice; 1 on shared CPUs)")
    p.add_argument("--no-figures", action="store_true", help="skip roc.png / pr.png")
    p.add_argument("--ood", metavar="RUN", help="an ood_ae run (cxr/ood.py): reject the split's images the gate "
                   "rejects and report mean AUROC on the accepted ones beside all (OUT/ood.csv; needs --shards)")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.from_predictions and args.runs:
        p.error("give either --runs (infer) or --from-predictions (re-analyse), not both")
    if not args.from_predictions and not (args.runs and args.shards):
        p.error("--runs and --shards are required unless --from-predictions is given")
    if args.bootstrap < 0 or not 0 < args.alpha < 1:
        p.error("--bootstrap must be >= 0 and --alpha in (0, 1)")
    if args.ood and not args.shards:
        p.error("--ood needs --shards (the gate scores the split's images)")


def _summary_line(result: dict[str, Any], args: argparse.Namespace, elapsed: float) -> str:
    scores, aucs = result["scores"], result["analysis"].aucs
    mean = aucs[aucs["label"] == "mean"].set_index("member")
    focus = ENSEMBLE if ENSEMBLE in mean.index else mean.index[-1]
    row = mean.loc[focus]
    ci = f" [{row.ci_low:.3f}, {row.ci_high:.3f}]" if np.isfinite(row.ci_low) else ""
    n_members = len([m for m in scores.scores if m != ENSEMBLE])
    where = f" on {result['ranks']} rank(s)" if result.get("ranks") else " from saved predictions"
    return (f"evaluated {n_members} member(s) on {scores.n} images of '{args.split}'{where} in {elapsed:.1f} s "
            f"({scores.n * n_members / max(elapsed, 1e-9):.0f} member-images/s); "
            f"{focus} mean AUROC {row.auroc:.3f}{ci}")


@cli_entry  # also tears down the launcher's process group on every exit path (shards.errors)
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    start = time.perf_counter()
    if args.from_predictions:
        per_split, infos = load_saved(args)
        source = f"predictions {args.from_predictions}"
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        state = _state(args)
        per_split, infos = infer_runs(args, state, _splits_needed(args))
        if per_split is None:  # not rank 0: rank 0 writes everything
            return 0
        source = f"runs {' '.join(map(str, args.runs))}; shards {args.shards}"
    result = analyse_and_write(args, per_split, infos, source)
    result["ranks"] = None if args.from_predictions else state.num_processes
    from cxr.report import format_stdout_table

    print(format_stdout_table(result["analysis"].aucs))
    print(_summary_line(result, args, time.perf_counter() - start))
    if args.ood:
        from cxr.ood import report_ood

        print(report_ood(args.ood, args.shards, args.split, result["scores"], Path(args.out)))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
