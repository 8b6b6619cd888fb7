"""The one typed config of a training run: a dataclass per component, YAML in, YAML out.

Sections (``section.key=value`` on the command line):

- ``data``       :class:`cxr.data.DataConfig`   — shards, resolution, batch, augmentation
- ``model``      :class:`ModelConfig`           — exactly the keyword arguments of ``cxr.models.build_model``
- ``loss``       :class:`cxr.models.losses.LossConfig` — loss and its options
- ``optim``      :class:`OptimConfig`           — Adam / AdamW
- ``schedule``   :class:`ScheduleConfig`        — ReduceLROnPlateau or cosine with linear warm-up
- ``train``      :class:`TrainConfig`           — epochs, precision, accumulation, early stopping, ...
- ``checkpoint`` :class:`CheckpointConfig`      — run dir, resume policy
- ``logging``    :class:`LoggingConfig`         — progress bar, log cadence, TensorBoard

:func:`load_config` reads a YAML file, applies overrides (each value parsed with
``yaml.safe_load``, so ``optim.betas=[0.9,0.99]`` and ``loss.cap=null`` work) and
checks every key and value: an unknown key or a bad value raises ``CxrError``
naming the key and the valid choices. :func:`config_hash` fingerprints the fields
that change the trajectory of training (resume refuses a mismatch).

Why the coercion (``_coerce``) and ``--help`` (``field_docs``) are hand-written, not OmegaConf or
tyro (measured by the retired ``bench/config_libs.py``, bench/RESULTS.md "config libraries"): prototypes of
both build the same dataclasses and the same hash on every shipped config and test input, and
would save ~60 lines net, but only 9/19 (OmegaConf) and 11/19 (tyro) of the tested error cases keep
a one-line message with the valid keys/choices or the fix (OmegaConf: "Did you mean" one key,
"could not be converted to Float", a tuple-length error naming no key; tyro: argparse's boxed
text). tyro reads neither YAML nor ``section.key=value``, so that parser stays anyway, and its help
lists ``--optim.lr FLOAT``, not the ``optim.lr=`` users type. Each adds 0.15–0.18 s to every start.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import math
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cxr.data import DataConfig
from cxr.models.losses import LossConfig
from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError


@dataclass
class ModelConfig:
    """Which network to build; the keys are ``cxr.models.build_model``'s keyword arguments."""

    name: Literal["densenet121", "densenet121_cbam", "resnet50", "beit", "vit", "cnn", "ood_ae"] = "densenet121"
    """Architecture of the suite (SPEC.md "Models")."""
    num_labels: int = 14
    """Number of output logits: the 14 ChestX-ray14 labels in canonical order."""
    pretrained: str | None = None
    """Local weights file for the backbone, or ``imagenet`` (timm's weights from the local Hugging Face
    cache; ``python -m cxr.models download NAME`` fetches them); never downloaded; null = random init."""
    metadata: Literal["none", "concat", "mlp"] = "none"
    """Fuse patient metadata (age, sex, view) into the head: none | concat | mlp."""
    meta_dim: int = 5
    """Length of the metadata vector of a batch (the shards carry 5 fields)."""
    conv_stem: bool = False
    """Learned stem taking the full-resolution image down to the backbone's input size."""
    grad_checkpointing: bool = False
    """Activation checkpointing in the backbone: less memory, ~30 % more compute."""
    channels_last: bool = False
    """NHWC memory format (faster convolutions on tensor-core GPUs; keep off on CPU)."""
    dropout: float = 0.0
    """Dropout before the final linear layer."""
    options: dict = field(default_factory=dict)
    """Architecture-specific keyword arguments (e.g. ``stem_size``); written flat in YAML
    as further keys of the ``model:`` section, checked against the builder's signature."""
    init_from: str | None = None
    """Start a new run from the weights of another run dir (its checkpoints/best, else last):
    weights only, fresh optimizer and schedule. The architecture must match; with another
    num_labels the head is re-initialised and the rest loaded. null = build as configured."""

    def __post_init__(self) -> None:
        if self.num_labels < 1 or self.meta_dim < 0:
            raise CxrError("model.num_labels must be ≥ 1 and model.meta_dim ≥ 0 — fix the config")
        if not 0.0 <= self.dropout < 1.0:
            raise CxrError(f"model.dropout={self.dropout}: must be in [0, 1) — e.g. 0.2")

    def kwargs(self) -> dict:
        """The flat ``build_model(**kwargs)`` dictionary (options merged in)."""
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("options", "init_from")
        }
        return {**out, **self.options}


@dataclass
class OptimConfig:
    """The optimizer (SPEC defaults: Adam, betas 0.9/0.999, weight decay 1e-5)."""

    name: Literal["adam", "adamw"] = "adam"
    """adam: L2 weight decay added to the gradient (coupled); adamw: decoupled decay."""
    lr: float = 1e-4
    """Peak learning rate (SPEC: 1e-4 for DenseNet, 1e-3 for ResNet)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decay rates."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    weight_decay: float = 1e-5
    """Weight decay of every parameter not in the model's own L2 group."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise CxrError("optim: lr and eps must be > 0 and weight_decay ≥ 0 — fix the config")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise CxrError(f"optim.betas={list(self.betas)}: each must be in [0, 1) — e.g. [0.9, 0.999]")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (SPEC: ReduceLROnPlateau on val loss)."""

    name: Literal["plateau", "cosine", "constant"] = "plateau"
    """plateau: ReduceLROnPlateau stepped once per epoch on ``monitor``; cosine: per-step
    cosine decay to ``min_lr`` after a linear warm-up; constant: lr stays at optim.lr."""
    monitor: Literal["val_loss", "val_mean_auroc"] = "val_loss"
    """plateau: the validation quantity watched (loss: lower is better; AUROC: higher)."""
    factor: float = 0.5
    """plateau: multiply the lr by this when the monitor stalls."""
    patience: int = 3
    """plateau: epochs without improvement before the lr is reduced."""
    min_delta: float = 1e-4
    """plateau: smallest absolute change that counts as an improvement."""
    min_lr: float = 1e-6
    """plateau: floor of the lr; cosine: the lr at the last step."""
    warmup_epochs: float = 0.0
    """cosine: linear warm-up from 0 to optim.lr over this many epochs (fractions allowed)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.factor < 1.0:
            raise CxrError(f"schedule.factor={self.factor}: must be in (0, 1) — e.g. 0.5")
        if self.patience < 0 or self.min_delta < 0 or self.min_lr < 0 or self.warmup_epochs < 0:
            raise CxrError("schedule: patience, min_delta, min_lr and warmup_epochs must be ≥ 0 — fix the config")
        if self.warmup_epochs > 0 and self.name != "cosine":
            raise CxrError(
                f"schedule.warmup_epochs={self.warmup_epochs}: only schedule.name=cosine warms up "
                f"— set schedule.name=cosine or schedule.warmup_epochs=0"
            )


@dataclass
class TrainConfig:
    """The loop: length, numerics, accumulation, early stopping, distributed timeouts."""

    epochs: int = 100
    """Maximum number of epochs (early stopping may end the run sooner)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0 = no limit); for smoke runs and benchmarks."""
    seed: int = 0
    """Seed of weight init and dropout; also of data order and augmentation unless data.seed is set."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; effective batch = data.batch_size × ranks × this.
    The last len(loader) % grad_accum_steps micro-batches of an epoch are left out (reported)."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient L2 norm to this value (0 = off)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision. auto: the launcher's choice (accelerate config), else no.
    bf16/fp16 are for GPUs (fp16 adds a loss scaler); CPU runs use no."""
    compile: bool = False
    """torch.compile the model (GPU; the first steps are slow while it compiles)."""
    best_metric: Literal["val_loss", "val_mean_auroc"] = "val_loss"
    """What makes the ``best`` checkpoint and drives early stopping."""
    early_stop_patience: int = 10
    """Stop after this many epochs without an improvement of best_metric (0 = never)."""
    early_stop_min_delta: float = 1e-5
    """Smallest absolute change of best_metric that resets early stopping's patience."""
    restore_best: bool = True
    """When early stopping ends the run, reload the best weights into the final ``last`` checkpoint."""
    threads: int = 0
    """torch intra-op threads per process (0 = torch's default)."""
    collective_timeout_s: float = 600.0
    """Timeout of the collectives (rendezvous, gradient all-reduce, checkpoint barriers): long enough
    for cold imports on NFS, the first compiled step and rank 0 writing a checkpoint."""
    stop_flag_timeout_s: float = 90.0
    """Timeout of the per-step stop-flag all-reduce (its own gloo group): a job whose peer died
    exits non-zero after about this long."""
    deterministic: bool = False
    """Deterministic kernels: torch.use_deterministic_algorithms(True), cuDNN deterministic and, on
    CUDA, CUBLAS_WORKSPACE_CONFIG=:4096:8 (slower on GPU; CPU kernels already are). docs/run-dir.md."""
    cudnn_benchmark: bool = True
    """CUDA only, when not deterministic: let cuDNN pick the fastest convolution algorithms."""

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise CxrError(f"train.{name}={getattr(self, name)}: must be ≥ 1 — fix the config")
        for name in ("max_steps", "clip_grad_norm", "early_stop_patience", "early_stop_min_delta", "threads"):
            if getattr(self, name) < 0:
                raise CxrError(f"train.{name}={getattr(self, name)}: must be ≥ 0 — fix the config")
        if self.collective_timeout_s <= 0 or self.stop_flag_timeout_s <= 0:
            raise CxrError("train.collective_timeout_s and train.stop_flag_timeout_s must be > 0 — e.g. 600 and 90")


@dataclass
class CheckpointConfig:
    """Where a run lives and how it resumes (layout: docs/run-dir.md)."""

    run_dir: str = "runs/default"
    """The run directory: config.yaml, metrics.csv, checkpoints/{last,best}, logs."""
    resume: str = "auto"
    """auto: continue from RUN/checkpoints/last when it exists; never: refuse to start over an
    existing checkpoint; or a path to a checkpoint folder to continue from."""
    force_resume: bool = False
    """Resume even though the checkpoint was written under a different config hash."""
    every_steps: int = 0
    """Also write ``last`` every N optimizer steps mid-epoch (0 = at epoch ends and on signals only)."""

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise CxrError("checkpoint.run_dir is empty — give the run a directory")
        if self.every_steps < 0:
            raise CxrError("checkpoint.every_steps must be ≥ 0 — fix the config")


@dataclass
class LoggingConfig:
    """What rank 0 shows and records while training."""

    progress: bool = True
    """Progress of each epoch on rank 0 (stderr): a tqdm bar on a terminal, a plain line every 10 % or
    60 s in a log file or Slurm .out (cxrbase.progress; CXR_PROGRESS_PCT, CXR_PROGRESS_S)."""
    log_every: int = 20
    """Optimizer steps between loss readings (a CPU-GPU sync) for the bar and train.log."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to RUN/tensorboard (needs the tensorboard package)."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers through accelerate (cxr/runs/tracking.py): any of tensorboard, mlflow (a local
    file store, or MLFLOW_TRACKING_URI), wandb (offline unless WANDB_MODE says otherwise); they get
    the config, every epoch's metrics and the artefact paths. pip install -e '.[tracking]'."""
    tracking_dir: str | None = None
    """Where the trackers write (MLflow's file store DIR/mlruns, W&B's offline runs, TensorBoard);
    null: tracking/ beside the run dir, shared by the runs of that folder."""
    experiment: str = "cxr"
    """MLflow experiment / W&B project / TensorBoard folder the run is recorded under."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise CxrError("logging.log_every must be ≥ 1 — e.g. 20")
        unknown = [t for t in self.trackers if t not in ("tensorboard", "mlflow", "wandb")]
        if unknown:
            raise CxrError(
                f"logging.trackers={self.trackers}: unknown {unknown[0]!r} — valid: tensorboard, mlflow, wandb"
            )
        if len(set(self.trackers)) != len(self.trackers):
            raise CxrError(f"logging.trackers={self.trackers}: a tracker named twice — name each once")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
# Settings that do not change what is trained: left out of the config hash.
UNHASHED = {
    "checkpoint": {"run_dir", "resume", "force_resume", "every_steps"},
    "logging": {"progress", "log_every", "tensorboard", "trackers", "tracking_dir", "experiment"},
    "train": {"threads", "collective_timeout_s", "stop_flag_timeout_s", "cudnn_benchmark"},
    "data": {"num_threads", "pin_memory", "source_workers", "cache_dir", "cache_max_gb"},
}
# Keys that earlier versions wrote into every run's config.yaml and that no longer exist, with the
# value every run had. Reading an old config.yaml accepts (and drops) them, and the hash counts them
# at that value, so the hashes of existing runs — which resume compares — do not change.
RETIRED = {
    "data": {"shuffle_buffer": 1000},  # never had an effect: training draws a global permutation per epoch
}


@dataclass
class Config:
    """A whole run: one instance per section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.data.seed is None:  # one seed drives init, data order and augmentation
            self.data.seed = self.train.seed
        # data.device=auto is decided here, so config.yaml and the hash carry gpu or cpu: a run of a
        # shipped config (which said gpu before auto existed) keeps its hash on a GPU machine
        self.device_note = self.data.resolve_device()
        # a ViT is built for the data's resolution (position embeddings resampled once, at build);
        # written into options so config.yaml rebuilds the same model for evaluation
        from cxr.models.transformer import input_size_options

        self.model.options = input_size_options(
            self.model.name, self.model.options, self.model.conv_stem, self.data.resolution
        )

    @classmethod
    def load(cls, run: str | Path) -> Config:
        """A finished run's config: ``RUN/config.yaml`` (or that file given itself), see :func:`load_run_config`."""
        return load_run_config(run)


# ---------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (None: all defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        raw = read_yaml(path)
        if raw is None:
            raise CxrError(
                f"{path}: empty config (no sections) — pass a YAML with at least data.shards "
                f"(e.g. a copy of cxr/configs/tiny.yaml), or omit --config for all defaults"
            )
        if not isinstance(raw, dict):
            raise CxrError(f"{path}: top level must be a mapping of sections {', '.join(SECTIONS)}")
    raw = _sections(raw)
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, where=str(path) if path else "config")


def load_run_config(run: str | Path) -> Config:
    """The typed config a run was trained with: ``RUN/config.yaml`` (``run`` a run dir or that file).

    The one reader of a run's config.yaml (the evaluator and every tool open runs through it). A
    config.yaml of an earlier version loads: retired keys are dropped (:data:`RETIRED`), keys it
    lacks take the defaults they trained with. CxrError when absent, not YAML, or without ``model:``.
    """
    path = Path(run)
    path = path / "config.yaml" if path.is_dir() else path
    if not path.is_file():
        raise CxrError(f"{path}: run config not found — is {path.parent} a training run dir (docs/run-dir.md)?")
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or "name" not in raw["model"]:
        raise CxrError(
            f"{path}: no `model:` section with a name — the evaluator rebuilds the model from it; "
            "restore the run's resolved config.yaml"
        )
    return config_from_dict(_sections(raw), str(path))


def _sections(raw: dict) -> dict:
    """A copy of ``{section: {key: value}}`` whose sections can be edited (an empty section: {})."""
    return {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in raw.items()}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (PyYAML keeps the last one silently,
    so a second ``data:`` section would drop the first, or ``resolution: 128`` override ``64``)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first at line "
                    f"{seen[key]}) — keep one of them"
                )
            try:
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    pass


def read_yaml(path: Path) -> Any:
    """A config file's YAML (safe: no Python objects), with a one-line CxrError for text that is not
    UTF-8, not YAML, or has a key twice in one mapping; None for an empty or comment-only file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CxrError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.object[err.start : err.start + 1]!r}) — save it as UTF-8"
        ) from None
    except OSError as err:
        raise CxrError(f"{path}: cannot read ({err.strerror}) — check the path and its permissions") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no Python objects
    except _DuplicateKey as err:
        raise CxrError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise CxrError(f"{path}: not valid YAML ({str(err).splitlines()[0]}) — fix the syntax") from None


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the configs shipped inside the package (cxr/configs/*.yaml)."""
    from importlib.resources import files

    folder = files("cxr") / "configs"
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml") and entry.is_file()
    }


def resolve_config_path(path: str | Path) -> Path:
    """``--config`` as given: a YAML file, or the name of a shipped config (``densenet121`` or
    ``densenet121.yaml`` → the packaged cxr/configs/densenet121.yaml), from any working directory."""
    given = Path(path)
    if given.is_file():
        return given
    shipped = shipped_configs()
    # a bare name, or the repo-relative cxr/configs/NAME.yaml of the docs run from another directory
    if given.parent in (Path("."), Path("cxr/configs")) and given.stem in shipped and given.suffix in ("", ".yaml"):
        return shipped[given.stem]
    raise CxrError(
        f"{path}: config file not found — pass a YAML file or a shipped config name: {', '.join(sorted(shipped))}"
    )


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise CxrError(
            f"override {item!r}: expected section.key=value, e.g. optim.lr=3e-4 (sections: {', '.join(SECTIONS)})"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise CxrError(f"override {item!r}: value is not valid YAML — quote strings with spaces") from None
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise CxrError(f"config section {parts[0]!r} must be a mapping")
    section[parts[1]] = value


def config_from_dict(raw: dict, where: str = "config") -> Config:
    """Build and validate a :class:`Config` from ``{section: {key: value}}``."""
    try:  # every message names where the config came from: the YAML file, else "config"
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise CxrError(f"unknown section {unknown[0]!r} — valid sections: {', '.join(SECTIONS)}")
        built = {}
        for name, cls in SECTIONS.items():
            section = raw.get(name) or {}
            if not isinstance(section, dict):
                raise CxrError(f"section {name!r} must be a mapping of key: value")
            built[name] = _build_section(name, cls, dict(section))
        cfg = Config(**built)
        check_input_size(cfg)
    except CxrError as err:
        raise CxrError(f"{where}: {err}") from err
    return cfg


# Smallest input side each family takes without conv_stem: 2 ** (its stride-2 reductions that
# shrink an odd or 1-pixel map to zero). cnn: 5 max pools; DenseNets: stem 4× and 3 transition
# average pools (unpadded); ResNet-50 reduces 32× too (padded, so smaller inputs would run, on a
# 0-information 1×1 map); ViT: one 16-px patch. BEiT resizes to its img_size itself.
MIN_INPUT = {"cnn": 32, "densenet121": 32, "densenet121_cbam": 32, "resnet50": 32, "vit": 16}


def check_input_size(cfg: Config) -> None:
    """data.resolution (or, with conv_stem, model.stem_size) must be at least the model's minimum."""
    need = MIN_INPUT.get(cfg.model.name)
    if need is None:
        return
    if cfg.model.conv_stem:
        size = cfg.model.options.get("stem_size", 224)
        if size < need:
            raise CxrError(
                f"model.stem_size={size}: model.name={cfg.model.name} needs an input of ≥ {need} px "
                f"— raise model.stem_size"
            )
    elif cfg.data.resolution < need:
        raise CxrError(
            f"data.resolution={cfg.data.resolution}: model.name={cfg.model.name} needs ≥ {need} px "
            f"(it downsamples by {need}) — raise data.resolution or set model.conv_stem=true"
        )


def _build_section(section: str, cls: type, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is ModelConfig:
        values = _split_model_options(values, names)
    kwargs = {}
    for key, value in values.items():
        if key in RETIRED.get(section, {}):
            continue
        if key not in names:
            raise CxrError(f"unknown key {section}.{key} — valid keys of {section}: {', '.join(names)}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # CxrError (an Exception, not a ValueError) passes through
        raise CxrError(f"section {section}: {err} — fix the config") from None


def _split_model_options(values: dict, names: list[str]) -> dict:
    """Move keys of the flat ``model:`` section that are not ModelConfig fields into ``options``,
    checked and typed against ``cxr.models.REGISTRY[name].options``."""
    options = dict(values.pop("options", None) or {})
    for key in [k for k in values if k not in names]:
        options[key] = values.pop(key)
    name = values.get("name", ModelConfig.name)
    valid = model_options(name)
    for key in options if valid is not None else ():  # an unregistered name: the model.name check reports it
        if key not in valid:
            shown = ", ".join([n for n in names if n != "options"] + list(valid))
            raise CxrError(f"unknown key model.{key} for model.name={name} — valid keys of model: {shown}")
        options[key] = _coerce(f"model.{key}", options[key], valid[key])
    if options:
        values["options"] = options
    return values


def model_options(name: str) -> dict[str, type] | None:
    """{option: type} of the family options of model ``name`` (None: not a registered model,
    which the ``name`` check reports)."""
    from cxr.models import REGISTRY

    spec = REGISTRY.get(name)
    return dict(spec.options) if spec is not None else None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type hint of ``key``; return it converted (int→float etc.)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0]) if len(inner) == 1 else value
    if origin is Literal:
        if isinstance(value, bool) and ("no" if not value else "yes") in args:
            value = "no" if not value else "yes"  # YAML 1.1 reads a bare `no` as false
        if value not in args:
            raise CxrError(f"{key}={value!r}: invalid — valid choices: {' | '.join(map(str, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise CxrError(f"{key}={value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CxrError(f"{key}={value!r}: expected an integer")
        return value
    if hint is float:  # YAML 1.1 reads "1e-4" (no dot) as a string: accept it as the number it plainly is
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise CxrError(f"{key}={value!r}: expected a number, e.g. 3e-4")
        if not math.isfinite(number):  # `.nan` / `.inf` are YAML floats; nothing here means them
            raise CxrError(f"{key}={value!r}: must be a finite number, not nan or inf — e.g. 3e-4")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise CxrError(f"{key}={value!r}: expected a string")
        return str(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise CxrError(f"{key}={value!r}: expected a list of {len(args) or 'some'} values, e.g. [0.9, 0.999]")
        inner = args if origin is tuple else (args[0],) * len(value) if args else (Any,) * len(value)
        return origin(_coerce(key, v, h) for v, h in zip(value, inner))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise CxrError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    return value


# ---------------------------------------------------------------------------- output
def config_to_dict(cfg: Config) -> dict:
    """Plain ``{section: {key: value}}`` with the model options flat (as in config.yaml)."""
    out = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        if isinstance(section, ModelConfig):
            out[name] = section.kwargs()
            if section.init_from is not None:  # written only when set: older run dirs keep their hash
                out[name]["init_from"] = section.init_from
        else:
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (sections in fixed order)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config to ``path`` atomically."""
    atomic_write_text(path, config_yaml(cfg))


def hashed_dict(cfg: Config) -> dict:
    """The part of the config that decides what is trained (input of :func:`config_hash`)."""
    full = config_to_dict(cfg)
    return {
        s: {**RETIRED.get(s, {}), **{k: v for k, v in keys.items() if k not in UNHASHED.get(s, ())}}
        for s, keys in full.items()
    }


def config_hash(cfg: Config) -> str:
    """16-hex fingerprint of :func:`hashed_dict` (stable across key order and runs)."""
    text = json.dumps(hashed_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(a: Config | dict, b: Config | dict) -> list[str]:
    """Keys (``section.key``) whose hashed values differ between two configs."""
    da = a if isinstance(a, dict) else hashed_dict(a)
    db = b if isinstance(b, dict) else hashed_dict(b)
    keys = {(s, k) for d in (da, db) for s, sec in d.items() for k in sec}
    return sorted(f"{s}.{k}" for s, k in keys if da.get(s, {}).get(k) != db.get(s, {}).get(k))


# ---------------------------------------------------------------------------- help
def describe_config() -> str:
    """Every key with its default and the docstring under its field (for ``--help``)."""
    lines = []
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = " ".join(docs.get(f.name, "").split())
            lines.append(f"  {name}.{f.name}={_plain(default)!r}")
            if doc:
                lines.extend("      " + ln for ln in textwrap.wrap(doc, 84))
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literals written under dataclass fields."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = nxt.value.value
    return docs
