"""logging.trackers: a training recorded in a real local MLflow file store, read back with MLflow's
own client and compared with the run's config.yaml and metrics.csv (read with yaml and pandas)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import MemoryLoader, tiny_config

from cxr.config import load_config
from cxr.train import train
from cxrbase.errors import CxrError

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

mlflow = pytest.importorskip("mlflow", reason="the tracking extra (pip install -e '.[tracking]') is not installed")


@pytest.fixture
def fresh_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.setenv(name, "unset")  # recorded as absent: undone after the test
        monkeypatch.delenv(name)


def test_mlflow_file_store_gets_config_metrics_artefacts_and_resume(tmp_path, fresh_env):
    run = tmp_path / "runs" / "r1"
    overrides = ("logging.trackers=[mlflow]", "logging.experiment=first-day")
    assert train(tiny_config(run, "train.epochs=2", *overrides), loader_fn=MemoryLoader) == 0
    store = tmp_path / "runs" / "tracking" / "mlruns"  # the default: tracking/ beside the run dir
    assert store.is_dir()
    client = mlflow.tracking.MlflowClient(f"file:{store}")
    experiment = client.get_experiment_by_name("first-day")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "r1" and found.info.status == "FINISHED"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    params = found.data.params
    assert params["optim.lr"] == str(saved["optim"]["lr"]) and params["data.resolution"] == str(
        saved["data"]["resolution"]
    )
    assert params["model.name"] == saved["model"]["name"] and params["run_dir"] == str(run.resolve())
    metrics = pd.read_csv(run / "metrics.csv")
    history = client.get_metric_history(found.info.run_id, "val_loss")
    assert [h.step for h in history] == list(metrics["step"])
    assert [h.value for h in history] == pytest.approx(list(metrics["val_loss"]), rel=1e-6)
    tags = found.data.tags
    assert Path(tags["cxr.artefact.checkpoint_best"]) == (run / "checkpoints" / "best").resolve()
    assert Path(tags["cxr.artefact.metrics_csv"]).is_file()
    # the same command with more epochs resumes the run and continues the same tracked run
    assert train(tiny_config(run, "train.epochs=3", *overrides), loader_fn=MemoryLoader) == 0
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == found.info.run_id
    metrics = pd.read_csv(run / "metrics.csv")
    history = client.get_metric_history(found.info.run_id, "val_loss")
    assert [h.step for h in history] == list(metrics["step"])
    assert [h.value for h in history] == pytest.approx(list(metrics["val_loss"]), rel=1e-6)
    assert len(history) == 3


def test_tracker_choices_are_checked_and_leave_the_hash_alone():
    from cxr.config import config_hash

    assert config_hash(load_config("tiny", ["logging.trackers=[mlflow, tensorboard]"])) == config_hash(
        load_config("tiny")
    )
    with pytest.raises(
        CxrError, match=r"logging.trackers=\['neptune'\]: unknown 'neptune' — valid: tensorboard, mlflow, wandb"
    ):
        load_config("tiny", ["logging.trackers=[neptune]"])
