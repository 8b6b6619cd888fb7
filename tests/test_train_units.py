"""Single-process pieces of training: checkpoints, RNG, signals, schedules, early stopping, and an
in-process exact resume after a real SIGUSR1 (fast; the multi-process versions are in test_train.py)."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import MemoryLoader, tiny_config
from safetensors.torch import load_file

from cxr.config import load_config
from cxr.runs import checkpoint as ckpt
from cxr.runs.distributed import StopFlag
from cxr.train import EXIT_REQUEUE, train
from cxr.training.setup import build_scheduler
from cxr.training.state import TrainState, update_best, update_early_stop
from cxrbase.errors import CxrError

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    state = ckpt.rng_state()
    expected = _draws()
    torch.save(state, tmp_path / "rng.pt")
    _draws()  # move every stream on
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer


def _step(model, optimizer):
    loss = model(torch.randn(6, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_then_load_restores_weights_optimizer_scheduler(tmp_path, accelerator):
    model, optimizer = _model_and_optimizer(0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        _step(model, optimizer)
        scheduler.step()
    state = {"loop": {"epoch": 2}, "lrs": [g["lr"] for g in optimizer.param_groups]}
    ckpt.save_checkpoint(
        accelerator,
        tmp_path,
        "last",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        per_rank={"loss_sum": 1.5},
        meta={"epoch": 2, "config_hash": "abc"},
    )
    folder = tmp_path / "checkpoints" / "last"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp")) and not list((tmp_path / "checkpoints").glob("*.old"))
    torch.load(folder / "state.pt", weights_only=True)  # no pickled code inside

    model2, optimizer2 = _model_and_optimizer(1)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=1, gamma=0.5)
    loaded = ckpt.load_checkpoint(accelerator, folder, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for pa, pb in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[pa][key], optimizer2.state[pb][key])
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert loaded["loop"] == {"epoch": 2} and loaded["rank"]["loss_sum"] == 1.5
    assert json.loads((folder / "meta.json").read_text())["config_hash"] == "abc"
    # the evaluator's path: safetensors keys are the plain module names
    assert set(load_file(str(folder / "model.safetensors"))) == set(model.state_dict())


def test_crash_between_renames_falls_back_and_recovers(tmp_path, accelerator):
    model, _ = _model_and_optimizer(0)
    ckpt.save_checkpoint(accelerator, tmp_path, "best", model=model, meta={"epoch": 1})
    root = tmp_path / "checkpoints"
    os.replace(root / "best", root / "best.old")  # the state right after the first rename of a swap
    assert ckpt.find_checkpoint(tmp_path, "best") == root / "best.old"
    ckpt.save_checkpoint(accelerator, tmp_path, "best", model=model, meta={"epoch": 2})
    assert sorted(p.name for p in root.iterdir()) == ["best"]
    assert ckpt.read_meta(root / "best")["epoch"] == 2


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, accelerator, monkeypatch):
    model, _ = _model_and_optimizer(0)
    ckpt.save_checkpoint(accelerator, tmp_path, "best", model=model, meta={"epoch": 1})
    before = (tmp_path / "checkpoints" / "best" / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(CxrError, match=r"checkpoints/best\.tmp: No space left on device writing the checkpoint"):
        ckpt.save_checkpoint(accelerator, tmp_path, "best", model=model, meta={"epoch": 2})
    assert not (tmp_path / "checkpoints" / "best.tmp").exists()
    assert ckpt.read_meta(ckpt.find_checkpoint(tmp_path, "best"))["epoch"] == 1
    assert (tmp_path / "checkpoints" / "best" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_flag_is_set_by_a_real_signal_and_handlers_are_restored(accelerator, sig):
    before = signal.getsignal(sig)
    flag = StopFlag(accelerator)
    try:
        assert not flag.agreed()
        os.kill(os.getpid(), sig)
        assert flag.agreed() and flag.signum == sig
    finally:
        flag.close()
    assert signal.getsignal(sig) == before


def test_cosine_with_warmup_matches_the_formula():
    cfg = load_config(
        None,
        [
            "schedule.name=cosine",
            "schedule.warmup_epochs=0.5",
            "schedule.min_lr=1e-4",
            "optim.lr=0.01",
            "train.epochs=3",
        ],
    )
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched, per_step = build_scheduler(cfg, opt, steps_per_epoch=10)
    assert per_step
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lr, floor, warm, total = 0.01, 1e-4, 5, 30  # hand transcription: linear warm-up, then cosine to floor
    want = [
        lr * (s + 1) / warm
        if s < warm
        else floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        for s in range(30)
    ]
    np.testing.assert_allclose(lrs, want, rtol=1e-12)


def test_plateau_follows_spec_defaults():
    cfg = load_config(None, ["optim.lr=1e-3"])  # SPEC: factor 0.5, patience 3, min_delta 1e-4, min lr 1e-6
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched, per_step = build_scheduler(cfg, opt, steps_per_epoch=10)
    assert not per_step
    # 1.0 then changes smaller than min_delta: epochs 2,3,4 are bad → after the 4th bad epoch the lr halves
    lrs = []
    for loss in [1.0, 0.99995, 0.99993, 0.99992, 0.99991, 0.5]:
        sched.step(loss)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4]


def test_best_and_early_stopping_by_hand():
    cfg = load_config(None, ["train.early_stop_patience=2", "train.early_stop_min_delta=0.01"])
    st = TrainState()
    seq = [1.0, 0.95, 0.945, 0.944, 0.5]
    out = []
    for epoch, loss in enumerate(seq):
        st.epoch = epoch
        out.append((update_best(cfg, st, {"val_loss": loss}), update_early_stop(cfg, st, {"val_loss": loss})))
    # 0.945 and 0.944 are new bests but not better by > 0.01: patience 2 runs out at the 4th epoch
    assert out == [(True, False), (True, False), (True, False), (True, True), (True, False)]
    assert st.best_epoch == 5
    auroc = load_config(None, ["train.best_metric=val_mean_auroc"])
    st = TrainState()
    assert update_best(auroc, st, {"val_mean_auroc": 0.6}) and not update_best(auroc, st, {"val_mean_auroc": 0.5})
    assert not update_best(auroc, st, {"val_mean_auroc": float("nan")})


# ------------------------------------------------------------------------ in-process exact resume


def test_in_process_signal_mid_epoch_then_resume_is_bitwise_exact(tmp_path):
    assert train(tiny_config(tmp_path / "a"), loader_fn=MemoryLoader) == 0

    state = {"killed": False}

    def killing_loader(cfg, split, **kw):
        # the first time epoch 2 starts, signal ourselves at its 5th micro-batch
        kill = split == "train" and kw.get("epoch") == 1 and kw.get("skip_batches") == 0 and not state["killed"]
        loader = MemoryLoader(cfg, split, kill_at=5 if kill else None, **kw)
        state["killed"] |= kill
        return loader

    assert train(tiny_config(tmp_path / "b"), loader_fn=killing_loader) == EXIT_REQUEUE
    meta = ckpt.read_meta(tmp_path / "b" / "checkpoints" / "last")
    assert meta["epoch"] == 1 and 0 < meta["step_in_epoch"] < 6, meta  # 12 micro-batches = 6 steps per epoch
    assert json.loads((tmp_path / "b" / "status.json").read_text())["state"] == "preempted"
    assert train(tiny_config(tmp_path / "b"), loader_fn=MemoryLoader) == 0

    for name in ("last", "best"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / name / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    def rows(run):
        with open(tmp_path / run / "metrics.csv") as fh:
            return [{k: v for k, v in r.items() if k != "time"} for r in csv.DictReader(fh)]

    assert rows("a") == rows("b") and len(rows("a")) == 3
    # a finished run started again does nothing
    assert train(tiny_config(tmp_path / "b"), loader_fn=MemoryLoader) == 0
    assert len(rows("b")) == 3


def test_resume_refuses_a_different_config(tmp_path):
    assert train(tiny_config(tmp_path / "r", "train.epochs=1"), loader_fn=MemoryLoader) == 0
    from cxrbase.errors import CxrError

    with pytest.raises(CxrError, match=r"optim\.lr.*force_resume"):
        train(tiny_config(tmp_path / "r", "train.epochs=1", "optim.lr=0.5"), loader_fn=MemoryLoader)
    with pytest.raises(CxrError, match="resume=never"):
        train(tiny_config(tmp_path / "r", "train.epochs=1", "checkpoint.resume=never"), loader_fn=MemoryLoader)


def test_signal_during_the_stop_flag_all_reduce_is_not_lost(monkeypatch):
    """A signal whose handler runs right after the flag's all-reduce returns (the rank was
    waiting there for its peers) must stop training at the next step, not vanish."""
    import torch.distributed as dist

    def all_reduce_then_signal(tensor, op=None, group=None):
        os.kill(os.getpid(), signal.SIGUSR1)  # peers agreed 0; the handler runs after we return

    stop = StopFlag(accelerator=None)
    try:
        stop.distributed = True
        monkeypatch.setattr(dist, "all_reduce", all_reduce_then_signal)
        assert stop.agreed() is False  # this step's agreement was taken before the signal
        assert stop.agreed() is True  # ...and the next step carries it
        assert stop.signum == signal.SIGUSR1
    finally:
        stop.close()


def test_loopback_warning_only_for_multi_node_runs_on_a_loopback_hostname():
    from cxr.runs.distributed import loopback_warning

    loop = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node-a"}
    table = {"node-a": "10.0.0.5"}

    def resolve(name):  # this host resolves like Debian's /etc/hosts: 127.0.1.1
        return table.get(name, "127.0.1.1")

    assert "GLOO_SOCKET_IFNAME" in loopback_warning(loop, resolve)
    assert loopback_warning({**loop, "GLOO_SOCKET_IFNAME": "ens5"}, resolve) is None
    assert loopback_warning({**loop, "LOCAL_WORLD_SIZE": "16"}, resolve) is None  # one node
    assert loopback_warning({**loop, "MASTER_ADDR": "127.0.0.1"}, resolve) is None  # all "nodes" here
    assert loopback_warning(loop, lambda name: "10.0.0.7") is None  # a routable hostname
    assert loopback_warning({}, resolve) is None  # a single process


def test_training_start_warns_of_a_tiny_val_and_train_labels_without_positives(tmp_path, caplog, capsys):
    """Battery 2, 10.1/10.4: shards whose val split is one image and whose train split has no
    positive of some labels; the labels named are counted here from the packed table by pandas."""
    import logging

    import pandas as pd
    from PIL import Image

    from cxr.training.setup import warn_small_or_skewed
    from cxrbase.labels import LABELS
    from shards.pack import pack

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(9):
        key = f"{i + 1:08d}_000"
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "img" / f"{key}.png")
        split = "val" if i == 0 else "test" if i < 3 else "train"
        rows.append(
            {
                "image": f"{key}.png",
                "patient": i + 1,
                "split": split,
                **{name: int(name in ("Effusion", "Mass") and i % 2 == 1) for name in LABELS},
                "age": 30 + i,
                "sex": "MF"[i % 2],
                "view": "PA",
            }
        )
    table = pd.DataFrame(rows)
    pack(table, [tmp_path / "img"], tmp_path / "shards", workers=1)
    train = table[table["split"] == "train"]
    none = [label for label in LABELS if train[label].sum() == 0]
    packed = capsys.readouterr().err  # pack says so too
    assert (
        f"warning: {tmp_path / 'shards' / 'manifest.json'}: split 'train' has no positive image of {', '.join(none)}"
        in packed
    )
    logger = logging.getLogger("cxr.train")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="cxr.train"):
            warn_small_or_skewed(load_config(None, [f"data.shards={tmp_path / 'shards'}", "data.resolution=64"]))
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        f"split 'train' has no positive image of {', '.join(none)} ({len(none)} of 14 labels)" in m for m in lines
    ), lines
    assert any("split 'val' has only 1 image(s)" in m and "AUROC undefined for 14 of 14 labels" in m for m in lines), (
        lines
    )
