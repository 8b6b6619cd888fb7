"""A whole run's :class:`Config`, built from a YAML file + ``section.key=value`` overrides (typed, validated),
or read back from a finished run's config.yaml (:meth:`Config.load`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cxr.config.coerce import _build_section
from cxr.config.sections import (
    SECTIONS,
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from cxr.config.yamlfile import read_yaml, resolve_config_path
from cxr.data import DataConfig
from cxr.models.losses import LossConfig
from cxrbase.errors import CxrError


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
        return load_run_config(run)


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
