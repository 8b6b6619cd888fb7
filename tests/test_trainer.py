"""The Trainer object (cxr/training/trainer.py) and the state it owns: the saved loop state keeps
the key older checkpoints were written with, each kind of model has its own validation, preempt()
writes what the launchers read, and the modules of the loop stay small enough to read."""

from __future__ import annotations

import ast
import json
import math
import signal
from pathlib import Path

import numpy as np

from cxr.config import load_config
from cxr.training.state import TrainState
from cxr.training.validation import ClassifierValidation, ReconstructionValidation, validation_for

ROOT = Path(__file__).resolve().parents[1]
# the modules one training is read in (the memory probe, cxr/training/probe.py, is a tool of the sweeps)
LOOP_MODULES = [
    "cxr/train.py",
    "cxr/training/trainer.py",
    "cxr/training/state.py",
    "cxr/training/resume.py",
    "cxr/training/setup.py",
    "cxr/training/validation.py",
    "cxr/training/epoch_report.py",
    "cxr/runs/run_log.py",
]


def test_loop_state_is_saved_under_the_key_older_checkpoints_hold():
    # state.pt ``loop`` as every checkpoint before the Trainer wrote it (by hand, not by the code)
    saved = {
        "epoch": 2,
        "step_in_epoch": 17,
        "global_step": 51,
        "best_value": 0.25,
        "best_epoch": 2,
        "early_best": 0.25,
        "bad_epochs": 0,
        "finished": False,
        "validating": True,
        "rows": [{"epoch": 1}, {"epoch": 2}],
    }
    st = TrainState.from_loop(saved)
    assert st.awaiting_validation is True and st.epoch == 2 and st.step_in_epoch == 17
    assert st.loss_sum == 0.0 and st.batches == 0  # the sums are this rank's, restored separately
    assert st.loop() == saved and list(st.loop()) == list(saved)  # same keys in the same order


def test_new_epoch_clears_awaiting_validation_and_the_sums():
    st = TrainState(epoch=1, step_in_epoch=5, awaiting_validation=True, loss_sum=3.0, batches=5, skipped=1)
    st.new_epoch()
    assert (st.epoch, st.step_in_epoch, st.awaiting_validation) == (2, 0, False)
    assert (st.loss_sum, st.batches, st.skipped, st.skipped_keys) == (0.0, 0, 0, [])


def test_each_kind_of_model_has_its_own_validation():
    assert type(validation_for(load_config(None, ["model.name=cnn"]))) is ClassifierValidation
    ood = load_config(ROOT / "cxr/configs/ood_ae.yaml", [])
    strategy = validation_for(ood)
    assert isinstance(strategy, ReconstructionValidation) and not strategy.shows_auroc
    # one reconstruction score per image, 14 labels: no label metrics, the AUROC column stays (NaN)
    scores = strategy.scores(ood, np.zeros((4, 14)), np.full((4, 1), 0.5))
    assert list(scores) == ["val_mean_auroc"] and math.isnan(scores["val_mean_auroc"])


def test_preempt_records_the_stop_for_the_launchers(tmp_path):
    from cxr.runs.distributed import destroy_process_group
    from cxr.runs.run_log import EXIT_REQUEUE
    from cxr.training.trainer import Trainer

    trainer = Trainer(load_config(None, [f"checkpoint.run_dir={tmp_path}", "model.name=cnn"]))
    try:
        trainer.state.epoch, trainer.state.step_in_epoch, trainer.state.global_step = 2, 3, 40
        assert trainer.preempt(signal.SIGUSR1) == EXIT_REQUEUE == 75
    finally:
        trainer.stop.close()
        destroy_process_group()
    status = json.loads((tmp_path / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("preempted", 75)
    assert (status["epoch"], status["step_in_epoch"], status["global_step"]) == (3, 3, 40)  # epoch from 1


def test_the_loop_modules_stay_small():
    too_long = []
    for name in LOOP_MODULES:
        text = (ROOT / name).read_text()
        lines = text.count("\n")
        if lines > 450:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    too_long.append(f"{name}: {node.name} has {length} lines")
    assert not too_long, too_long
