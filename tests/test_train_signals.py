"""Preemption signals with the wds back end's DataLoader workers: srun, `scancel --signal` and
submitit signal every process of the job, workers included; the workers must ignore them and the
main process must stop at a step boundary with `last` saved and exit 75."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import build_synth_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory) -> Path:
    return build_synth_shards(tmp_path_factory.getbasetemp())


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and re.search(pattern, log.read_text(errors="replace"), re.M):
            return
        assert proc.poll() is None, f"training exited ({proc.returncode}) before {pattern!r}"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {log} after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1])  # SIGTERM, SIGUSR2: the same mask and handler
def test_wds_workers_ignore_the_job_signal_and_training_saves_and_exits_75(synth_shards, tmp_path, sig):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "cxr.train",
        "--config",
        "cxr/configs/tiny.yaml",
        f"data.shards={synth_shards}",
        f"checkpoint.run_dir={run_dir}",
        "data.backend=wds",
        "data.num_threads=2",
        "data.resolution=64",
        "model.stem_size=64",
        "data.batch_size=4",
        "train.epochs=100",
        "logging.progress=false",
        "logging.log_every=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = open(tmp_path / "train.out", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(run_dir / "train.log", r"^.* step 3 epoch 1 ", proc)  # workers are up and feeding
        os.killpg(proc.pid, sig)  # like srun: every process of the group, the workers included
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = (tmp_path / "train.out").read_text(errors="replace")
    assert rc == 75, text[-3000:]
    assert "DataLoader worker" not in text and "Traceback" not in text, text[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == 75
    meta = json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["global_step"] >= 3 and (run_dir / "checkpoints" / "last" / "state.pt").is_file()
    assert f"stopped by {signal.Signals(sig).name}" in (run_dir / "train.log").read_text()
