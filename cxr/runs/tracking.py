"""Experiment tracking (``logging.trackers``): TensorBoard, MLflow, W&B through accelerate's trackers.

accelerate already implements the three (``Accelerator(log_with=...)``, ``init_trackers``,
``log``); this module only chooses where they write, what the run records and how a resumed run
continues its tracked run:

- **where**: ``logging.tracking_dir`` (default: ``tracking/`` beside the run dir, so the runs of
  one folder share one store). MLflow gets the local file store ``file:DIR/mlruns`` unless
  ``MLFLOW_TRACKING_URI`` is set (MLflow ≥ 3.8 wants ``MLFLOW_ALLOW_FILE_STORE=true`` for it,
  set here for that store only); W&B runs offline (``WANDB_MODE=offline`` unless set) into
  ``DIR/wandb`` (``wandb sync`` uploads later); TensorBoard writes ``DIR/<experiment>/``.
- **what**: the resolved config flattened (``data.resolution`` ...) plus ``config_hash`` and
  ``run_dir`` as parameters, every metrics.csv row (train loss, lr, val metrics) at its global
  step, and at the end the artefact paths (run dir, checkpoints, metrics.csv, train.log,
  val_predictions.parquet) as MLflow tags / W&B summary entries. Paths, not copies: checkpoints
  of 1024² models are large and the run dir stays the one owner of its files.
- **resume**: the MLflow run id is kept in ``RUN/tracking.json`` (this module is its one writer),
  so the same command resumes the same MLflow run.

Every tracker call happens on rank 0 only (accelerate's ``on_main_process``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from cxr.config import Config

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name → module it needs
TRACKING_FILE = "tracking.json"


def tracking_dir(cfg: Config) -> Path:
    """Where the trackers write: logging.tracking_dir, else RUN_DIR/../tracking."""
    if cfg.logging.tracking_dir:
        return Path(cfg.logging.tracking_dir).resolve()
    return Path(cfg.checkpoint.run_dir).resolve().parent / "tracking"


def accelerator_kwargs(cfg: Config) -> dict[str, Any]:
    """``Accelerator(**kwargs)`` for the configured trackers ({} without any); checks each tracker's
    package is installed and sets the stores' environment defaults (a value the user set wins)."""
    names = list(cfg.logging.trackers)
    if not names:
        return {}
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise CxrError(
            f"logging.trackers={names}: the {', '.join(missing)} package is not installed — "
            f"pip install -e '.[tracking]' (or pip install {' '.join(missing)}), or drop it from "
            "logging.trackers"
        )
    where = tracking_dir(cfg)
    if "mlflow" in names and "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = f"file:{where / 'mlruns'}"
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(where))
    return {"log_with": names, "project_dir": str(where)}


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` of the resolved config (lists and mappings as text)."""
    from cxr.config import config_to_dict

    flat = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = (
                value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
            )
    return flat


def start(accelerator: Accelerator, cfg: Config, run_dir: Path, config_hash: str) -> None:
    """Open (or, on resume, re-open) the tracked run and record the config."""
    if not cfg.logging.trackers:
        return
    where = tracking_dir(cfg)
    if accelerator.is_main_process:
        where.mkdir(parents=True, exist_ok=True)
    previous = read_tracking(run_dir)
    init: dict[str, dict[str, Any]] = {
        "mlflow": {
            "run_name": run_dir.name,
            "run_id": previous.get("mlflow_run_id"),
            "tags": {"cxr.run_dir": str(run_dir.resolve()), "cxr.config_hash": config_hash},
        },
        "wandb": {"name": run_dir.name, "dir": str(where), "id": previous.get("wandb_run_id"), "resume": "allow"},
    }
    config = {**flat_config(cfg), "config_hash": config_hash, "run_dir": str(run_dir.resolve())}
    if previous.get("mlflow_run_id"):
        config = {}  # MLflow refuses to log a parameter twice; the resumed run has them already
    accelerator.init_trackers(
        cfg.logging.experiment,
        config=config or None,
        init_kwargs={k: v for k, v in init.items() if k in cfg.logging.trackers},
    )
    if accelerator.is_main_process:
        ids = dict(previous)
        if "mlflow" in cfg.logging.trackers:
            ids["mlflow_run_id"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
            ids["mlflow_tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI")
        if "wandb" in cfg.logging.trackers:
            ids["wandb_run_id"] = accelerator.get_tracker("wandb", unwrap=True).id
        atomic_write_text(run_dir / TRACKING_FILE, json.dumps(ids, indent=2) + "\n")


def read_tracking(run_dir: Path) -> dict[str, Any]:
    """RUN/tracking.json (the tracked runs' ids), {} when there is none."""
    path = Path(run_dir) / TRACKING_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise CxrError(f"{path}: unreadable — delete it (the next run starts a new tracked run)") from None


def log_epoch(accelerator: Accelerator, cfg: Config, row: dict[str, Any], step: int) -> None:
    """One metrics.csv row (its numbers) at the global step."""
    if cfg.logging.trackers:
        accelerator.log(
            {
                k: float(v)
                for k, v in row.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            },
            step=step,
        )


def artefact_paths(run_dir: Path) -> dict[str, str]:
    """The run's files a tracker points at (those that exist)."""
    run_dir = run_dir.resolve()
    names = {
        "run_dir": ".",
        "checkpoint_best": "checkpoints/best",
        "checkpoint_last": "checkpoints/last",
        "metrics_csv": "metrics.csv",
        "train_log": "train.log",
        "config_yaml": "config.yaml",
        "val_predictions": "val_predictions.parquet",
    }
    return {k: str(run_dir / v) for k, v in names.items() if (run_dir / v).exists()}


def finish(accelerator: Accelerator, cfg: Config, run_dir: Path) -> None:
    """Record the artefact paths and close the trackers (rank 0)."""
    if not cfg.logging.trackers or not accelerator.is_main_process:
        return
    paths = artefact_paths(run_dir)
    if "mlflow" in cfg.logging.trackers:
        import mlflow

        mlflow.set_tags({f"cxr.artefact.{k}": v for k, v in paths.items()})
    if "wandb" in cfg.logging.trackers:
        accelerator.get_tracker("wandb", unwrap=True).summary.update({f"artefact/{k}": v for k, v in paths.items()})
    close(accelerator)


def close(accelerator: Accelerator) -> None:
    """Finish every tracker (not ``end_training``, which would also tear down the process group)."""
    for tracker in getattr(accelerator, "trackers", []):
        tracker.finish()
    accelerator.trackers = []
