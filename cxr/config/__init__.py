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

The package, by job: :mod:`~cxr.config.sections` (the section dataclasses, :data:`SECTIONS`),
:mod:`~cxr.config.loading` (:class:`Config`: from YAML + overrides, or a run's config.yaml),
:mod:`~cxr.config.yamlfile` (strict YAML, shipped config names), :mod:`~cxr.config.coerce` (values
against type hints), :mod:`~cxr.config.hashing` (dict / YAML out, hash, diff) and
:mod:`~cxr.config.help` (``--help`` text). Import from ``cxr.config``.
"""

from cxr.config.coerce import model_options
from cxr.config.hashing import config_diff, config_hash, config_to_dict, config_yaml, hashed_dict, save_config
from cxr.config.help import describe_config, field_docs
from cxr.config.loading import MIN_INPUT, Config, check_input_size, config_from_dict, load_config, load_run_config
from cxr.config.sections import (
    RETIRED,
    SECTIONS,
    UNHASHED,
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from cxr.config.yamlfile import read_yaml, resolve_config_path, shipped_configs

__all__ = [
    "MIN_INPUT",
    "RETIRED",
    "SECTIONS",
    "UNHASHED",
    "CheckpointConfig",
    "Config",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "check_input_size",
    "config_diff",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "config_yaml",
    "describe_config",
    "field_docs",
    "hashed_dict",
    "load_config",
    "load_run_config",
    "model_options",
    "read_yaml",
    "resolve_config_path",
    "save_config",
    "shipped_configs",
]
