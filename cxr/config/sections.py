"""The config sections of a run: one dataclass per component (:class:`cxr.config.Config` holds them all).

The string literal under each field is its ``--help`` text (read by :func:`cxr.config.help.field_docs`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from cxr.data import DataConfig
from cxr.models.losses import LossConfig
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
