"""DeepSpeed ZeRO-2 with bf16 (the GPU recipe of the docs), on CPU: trains, is preempted, checkpoints one
optimizer partition per rank, resumes with identical replicas, and writes fp32 master weights to
model.safetensors. One training checked every way (it used to be two: this one and an fp32 twin in
test_train.py that checked the partitions and the replicas; each DeepSpeed start costs ~30 s on 2 cores)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    ROOT,
    STEPS_PER_EPOCH,
    finish,
    launch,
    metrics_rows,
    output,
    rank_pids,
    wait_for_line,
    weights,
)

pytestmark = pytest.mark.slow


ZERO2 = ROOT / "launch" / "configs" / "deepspeed_zero2.yaml"


def launch_bf16(shards: Path, run_dir: Path) -> subprocess.Popen:
    """The documented GPU command, on CPU: `accelerate launch --config_file deepspeed_zero2.yaml
    --mixed_precision bf16 cxr/train.py ... train.mixed_precision=auto`."""
    return launch(
        shards,
        run_dir,
        "train.mixed_precision=auto",
        config_file=ZERO2,
        readme_cli=True,
        launcher_args=("--mixed_precision", "bf16"),
    )


def test_deepspeed_zero2_bf16_trains_resumes_and_saves_fp32(train_shards, tmp_path):
    run_dir = tmp_path / "ds-bf16"
    run_dir.mkdir()
    proc = launch_bf16(train_shards, run_dir)
    pids = rank_pids(run_dir, proc)
    wait_for_line(run_dir, rf"step {STEPS_PER_EPOCH + 2} epoch 2 ", proc)
    os.kill(pids[0], signal.SIGUSR1)
    assert finish(proc) != 0, output(run_dir)[-3000:]
    assert yaml.safe_load((run_dir / "status.json").read_text())["exit_code"] == 75, output(run_dir)[-3000:]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["mixed_precision"] == "bf16"  # resolved from the launcher
    assert "DEEPSPEED" in (run_dir / "train.log").read_text()
    last = run_dir / "checkpoints" / "last"
    partitions = sorted(p.name for p in (last / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(partitions) == 2, partitions  # ZeRO: one optimizer partition per rank
    assert yaml.safe_load((last / "meta.json").read_text())["epoch"] == 1
    rows_before = metrics_rows(run_dir)

    assert finish(launch_bf16(train_shards, run_dir)) == 0, output(run_dir)[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and re.search(r"replicas: .* — identical", log)
    rows = metrics_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2] and rows[0] == rows_before[0]
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])
    for name in ("last", "best"):
        for key, tensor in weights(run_dir, name).items():
            if tensor.is_floating_point():
                assert tensor.dtype == torch.float32, (name, key, tensor.dtype)  # fp32 master weights
                assert torch.isfinite(tensor).all(), (name, key)
