"""End-to-end training on synthetic phantom shards with real launchers (slow; CI runs them).

Every run: the `tiny` config at 64 px, 2 processes through `accelerate launch` (gloo on CPU).
References are independent of the training code: the split table written by `shards split`,
the safetensors files on disk, the worker exit status printed by torchrun, wall-clock time.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import (
    BIN,
    CPU2,
    EPOCHS,
    ROOT,
    STEPS_PER_EPOCH,
    finish,
    free_port,
    launch,
    launch_env,
    metrics_rows,
    output,
    rank_pids,
    wait_for_line,
    weights,
)

pytestmark = pytest.mark.slow

# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_a(train_shards, tmp_path_factory) -> Path:
    """Run A: 2 ranks, uninterrupted, EPOCHS epochs."""
    run_dir = tmp_path_factory.mktemp("runs") / "a"
    rc = finish(launch(train_shards, run_dir))
    assert rc == 0, output(run_dir)[-4000:]
    return run_dir


# ------------------------------------------------------------------------------- tests
def test_ddp_two_ranks_learn_and_hold_identical_weights(run_a, train_shards):
    log = (run_a / "train.log").read_text()
    pids = re.search(r"start: 2 rank\(s\) .* pids \[(\d+), (\d+)\]", log)
    assert pids and pids.group(1) != pids.group(2), "two worker processes"

    # one metrics row per epoch, in order
    rows = metrics_rows(run_a)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert [int(r["step"]) for r in rows] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    # the loss decreases: per-step losses logged by rank 0, first vs last quarter of the run
    losses = [float(x) for x in re.findall(r"^\S+ \S+ step \d+ .* loss ([\d.]+)", log, re.M)]
    assert len(losses) == STEPS_PER_EPOCH * EPOCHS
    quarter = len(losses) // 4
    assert sum(losses[-quarter:]) / quarter < 0.85 * sum(losses[:quarter]) / quarter, losses
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

    # both ranks hold the same weights, and rank 0's fingerprint is that of the saved weights,
    # recomputed here from the safetensors file in the model's state-dict order
    found = re.search(r"replicas: weights sha256 per rank \['(\w+)', '(\w+)'\] — identical", log)
    assert found and found.group(1) == found.group(2), log[-2000:]
    from cxr.models import build_model

    model_kwargs = yaml.safe_load((run_a / "config.yaml").read_text())["model"]
    order = list(build_model(**model_kwargs).state_dict())
    saved = weights(run_a)
    digest = hashlib.sha256()
    for key in order:
        digest.update(key.encode())
        digest.update(saved[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert digest.hexdigest()[:16] == found.group(1)

    # validation saw every val image exactly once (reference: the split table)
    splits = pd.read_parquet(train_shards.parent / "splits.parquet")
    want = sorted(str(Path(x).stem) for x in splits.loc[splits["split"] == "val", "image"])
    preds = pd.read_parquet(run_a / "val_predictions.parquet")
    assert sorted(preds["key"]) == want
    assert ((preds.drop(columns="key") >= 0) & (preds.drop(columns="key") <= 1)).all().all()
    status = yaml.safe_load((run_a / "status.json").read_text())
    assert status["state"] == "finished" and status["global_step"] == STEPS_PER_EPOCH * EPOCHS


def test_sigusr1_mid_epoch_then_resume_is_bitwise_exact(run_a, train_shards, tmp_path_factory):
    run_b = tmp_path_factory.mktemp("runs") / "b"
    proc = launch(train_shards, run_b)
    pids = rank_pids(run_b, proc)
    wait_for_line(run_b, rf"step {STEPS_PER_EPOCH + 3} epoch 2 ", proc)  # 3 steps into epoch 2
    os.kill(pids[1], signal.SIGUSR1)  # only rank 1 is told: the all-reduced flag must stop both
    rc = finish(proc)
    out = output(run_b)
    assert rc != 0, "the launcher reports the requeue status as a failure"
    assert re.search(r"exitcode\s*:\s*75", out), out[-3000:]
    status = yaml.safe_load((run_b / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == 75
    meta = yaml.safe_load((run_b / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["epoch"] == 1 and 3 <= meta["step_in_epoch"] < STEPS_PER_EPOCH, meta  # mid-epoch
    assert "stopped by SIGUSR1" in (run_b / "train.log").read_text()

    rc = finish(launch(train_shards, run_b))  # the same command again: resume=auto
    assert rc == 0, output(run_b)[-3000:]
    assert (
        f"resumed from {run_b}/checkpoints/last at epoch 2 step {meta['step_in_epoch']}"
        in (run_b / "train.log").read_text()
    )
    for name in ("last", "best"):
        a, b = weights(run_a, name), weights(run_b, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}/{key} differs"
    rows_a, rows_b = metrics_rows(run_a), metrics_rows(run_b)
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows_a] == [
        {k: v for k, v in r.items() if k != "time"} for r in rows_b
    ]
    pd.testing.assert_frame_equal(
        pd.read_parquet(run_a / "val_predictions.parquet"), pd.read_parquet(run_b / "val_predictions.parquet")
    )


def test_two_nodes_on_localhost_match_one_node_bitwise(run_a, train_shards, tmp_path_factory):
    """2 "machines" × 1 process (accelerate --num_machines 2 over 127.0.0.1) = 1 machine × 2 processes."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    base = yaml.safe_load(CPU2.read_text())
    port = free_port()
    configs = []
    for rank in (0, 1):
        cfg = {
            **base,
            "num_machines": 2,
            "num_processes": 2,
            "machine_rank": rank,
            "main_process_ip": "127.0.0.1",
            "main_process_port": port,
            "same_network": True,
        }
        configs.append(tmp / f"machine{rank}.yaml")
        configs[-1].write_text(yaml.safe_dump(cfg))
    run_dir = tmp / "run"
    run_dir.mkdir()  # both "nodes" share the run dir, as on a shared filesystem
    procs = [launch(train_shards, run_dir, config_file=c, port=port) for c in configs]
    codes = [finish(p) for p in procs]
    assert codes == [0, 0], output(run_dir)[-4000:]
    log = (run_dir / "train.log").read_text()
    assert re.search(r"start: 2 rank\(s\) .* pids \[(\d+), (\d+)\]", log), log[:2000]
    assert log.count("start: ") == 1, "only global rank 0 writes train.log (machine 1's local rank 0 must not)"
    for name in ("last", "best"):
        a, b = weights(run_a, name), weights(run_dir, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}/{key} differs"


def test_killed_rank_makes_the_launcher_fail_within_timeout(train_shards, tmp_path_factory):
    """Started with torchrun (`-m cxr.train`) this time: the other launch path."""
    run_dir = tmp_path_factory.mktemp("runs") / "killed"
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "cxr.train",
        "--config",
        "cxr/configs/tiny.yaml",
        f"data.shards={train_shards}",
        f"checkpoint.run_dir={run_dir}",
        "data.resolution=64",
        "logging.progress=false",
        "logging.log_every=1",
        "train.collective_timeout_s=60",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=launch_env(),
        stdout=open(run_dir.parent / "killed.out", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pids = rank_pids(run_dir, proc)
    wait_for_line(run_dir, r"step 3 epoch 1 ", proc)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    rc = finish(proc, timeout=300)
    assert rc != 0
    assert time.time() - t0 < 120, f"the job took {time.time() - t0:.0f} s to fail"


def test_gpu_decode_without_cuda_is_refused_first_and_ends_the_launchers_report(train_shards, tmp_path_factory):
    """data.device=gpu on a CPU machine: refused before the model, the process group or the run dir,
    and under `accelerate launch` the one-line error is the last field of the launcher's report
    (the ChildFailedError block ends with it, not with a link to the torchelastic docs)."""
    run_dir = tmp_path_factory.mktemp("runs") / "gpu_on_cpu"
    rc = finish(launch(train_shards, run_dir, "data.device=gpu"), timeout=300)
    assert rc != 0
    lines = [ln.strip() for ln in output(run_dir).splitlines() if ln.strip().strip("=")]
    assert lines[-1] == (
        "traceback : error: data.device=gpu: no CUDA device is visible to this process — set "
        "data.device=auto (GPU decode where CUDA is, CPU otherwise) or data.device=cpu"
    ), lines[-12:]
    assert not run_dir.exists()  # nothing was built: no lock, no train.log, no config.yaml
