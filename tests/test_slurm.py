"""The Slurm workflow on a real single-node Slurm (slurm/local-cluster.sh): `sbatch slurm/ensemble.sh`,
preemption -> requeue -> exact resume, a failing member, and the submitit launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from helpers import build_synth_shards

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "slurm" / "local-cluster.sh"

pytestmark = pytest.mark.slow
TINY = [
    "data.resolution=64",
    "model.stem_size=64",
    "model.width=8",  # the cnn 8 channels wide (as tests/helpers.launch): half the CPU of the default
    "data.num_threads=0",
    "logging.progress=false",
    "logging.log_every=1",
]


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def slurm():
    """A running local Slurm: started here (and stopped at the end) unless it already ran.
    Its config lives under CXR_SLURM_HOME; SLURM_CONF points every client (sbatch, sacct,
    submitit, the jobs) at it. Where another Slurm is configured or running, skip visibly."""
    installed = shutil.which("sbatch") and shutil.which("slurmctld")
    if not installed and (os.geteuid() != 0 or not shutil.which("apt-get")):
        pytest.skip("Slurm is not installed and cannot be (needs root and apt-get): run slurm/local-cluster.sh start")
    check = sh("bash", str(CLUSTER), "check", check=False)
    if check.returncode == 3:
        pytest.skip(f"local Slurm not started: {check.stderr.strip()}")
    was_up = sh("bash", str(CLUSTER), "status", check=False).returncode == 0
    started = sh("bash", str(CLUSTER), "start", check=False)
    if started.returncode == 3:
        pytest.skip(f"local Slurm not started: {started.stderr.strip()}")
    if started.returncode != 0:
        pytest.fail(f"slurm/local-cluster.sh start failed: {started.stderr}")
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = sh("bash", str(CLUSTER), "conf").stdout.strip()
    yield
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before
    if not was_up:
        sh("bash", str(CLUSTER), "stop", check=False)


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    return build_synth_shards(tmp_path_factory.getbasetemp())


def sacct(job: str) -> list[dict]:
    """Every record of a job (-D: requeued attempts too), allocations only."""
    fields = ["JobID", "State", "Start", "End", "ExitCode"]
    out = sh("sacct", "-n", "-P", "-D", "-X", "-j", job, "-o", ",".join(fields)).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


def wait_jobs(jobs: list[str], timeout: float) -> None:
    """Until squeue lists none of them."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not sh("squeue", "-h", "-j", ",".join(jobs), check=False).stdout.strip():
            return
        time.sleep(2)
    sh("scancel", *jobs, check=False)
    pytest.fail(f"jobs {jobs} still queued after {timeout} s")


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def wait_for_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.5)
    pytest.fail(f"{path} never showed {text!r}")


def submit_ensemble(tmp_path: Path, ensemble: Path, shards: Path, overrides: list[str]) -> tuple[str, str, Path]:
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        "CXR_ENSEMBLE": str(ensemble),
        "CXR_SHARDS": str(shards),
        "CXR_RUNS": str(runs),
        "CXR_PROFILE": "cpu-local",
        "CXR_PROCS_PER_NODE": "1",
        "CXR_THREADS": "1",
        "CXR_SBATCH_ARGS": "--cpus-per-task=1 --mem=2G",
        "CXR_TRAIN_OVERRIDES": " ".join(overrides),
        "CXR_RESIGNAL_SECONDS": "3",
    }
    # The README's way: sbatch the script; its submit stage runs as a small job.
    out = sh("sbatch", "--parsable", "--wait", str(ROOT / "slurm" / "ensemble.sh"), cwd=ROOT, env=env)
    job = out.stdout.strip().split(";")[0]
    # the submit job's own .out ends up beside the other logs, not in the repository root
    assert not (ROOT / f"cxr-ensemble-submit-{job}.out").exists()
    submit_log = (runs / "logs" / f"cxr-ensemble-submit-{job}.out").read_text()
    array = submit_log.split("job array ")[1].split()[0]
    evaluator = submit_log.split("evaluator job ")[1].split()[0]
    assert out.stdout.strip()
    return array, evaluator, runs


def test_sbatch_ensemble_with_preemption(slurm, synth_shards, tmp_path):
    """Two members of one config (the tiny ensemble's, both seed 1): both complete, member b
    is preempted with USR1, requeues and resumes; it ends with the weights of the
    uninterrupted member a; the evaluator starts only after both and reports per-label
    AUROCs for both members and the ensemble."""
    tiny = yaml.safe_load((ROOT / "launch" / "ensembles" / "tiny.yaml").read_text())
    seed = tiny["members"][0]["overrides"]["train.seed"]
    twins = {
        **tiny,
        "name": "twins",
        "members": [{"name": "a", "overrides": {"train.seed": seed}}, {"name": "b", "overrides": {"train.seed": seed}}],
    }
    ensemble = tmp_path / "twins.yaml"
    ensemble.write_text(yaml.safe_dump(twins))
    array, evaluator, runs = submit_ensemble(
        tmp_path, ensemble, synth_shards, [*TINY, "train.epochs=4", "train.max_steps=48"]
    )
    wait_for_text(runs / "b" / "train.log", " step 3 ", timeout=240)
    sh("scancel", "--batch", "--signal=USR1", f"{array}_1")
    wait_jobs([array, evaluator], timeout=420)

    a, b = sacct(f"{array}_0"), sacct(f"{array}_1")
    assert [r["State"] for r in a] == ["COMPLETED"]
    assert [r["State"] for r in b] == ["REQUEUED", "COMPLETED"], b
    log_b = (runs / "b" / "train.log").read_text()
    assert "stopped by SIGUSR1" in log_b and f"resumed from {runs / 'b' / 'checkpoints' / 'last'}" in log_b

    import torch
    from safetensors.torch import load_file

    wa = load_file(runs / "a" / "checkpoints" / "last" / "model.safetensors")
    wb = load_file(runs / "b" / "checkpoints" / "last" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the preempted member diverged from the uninterrupted one"

    [ev] = sacct(evaluator)
    assert ev["State"] == "COMPLETED", ev
    assert when(ev["Start"]) >= max(when(a[-1]["End"]), when(b[-1]["End"]))
    aucs = (runs / "report" / "aucs.csv").read_text()
    for who in ("a", "b", "ensemble"):
        assert who in aucs
    assert "Atelectasis" in aucs and "Pneumothorax" in aucs


def test_failing_member_blocks_the_evaluator(slurm, synth_shards, tmp_path):
    ensemble = tmp_path / "bad.yaml"
    ensemble.write_text(
        yaml.safe_dump(
            {
                "name": "bad",
                "config": "cxr/configs/tiny.yaml",
                "members": [{"name": "broken", "overrides": {"model.name": "no_such_model"}}],
            }
        )
    )
    array, evaluator, runs = submit_ensemble(tmp_path, ensemble, synth_shards, TINY)
    wait_jobs([array, evaluator], timeout=240)
    [member] = sacct(f"{array}_0")
    assert member["State"] == "FAILED" and member["ExitCode"] != "0:0"
    [ev] = sacct(evaluator)
    assert ev["State"] == "CANCELLED" and ev["Start"] in ("None", "Unknown", ev["End"])
    assert not (runs / "report").exists()
    log = next((runs / "logs").glob(f"*{array}_0.out")).read_text()
    assert "no_such_model" in log


def test_submitit_slurm_two_tasks_preempted(slurm, synth_shards, tmp_path, monkeypatch):
    """launch.submit on Slurm: 2 submitit tasks form one 2-rank run; job._interrupt() makes it
    checkpoint, submitit's checkpoint() requeues it, and it resumes from `last`."""
    from launch import submit

    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs"
    args = submit.build_parser().parse_args(
        [
            "train",
            "--cluster",
            "slurm",
            "--profile",
            "cpu-local",
            "--shards",
            str(synth_shards),
            "--runs",
            str(runs),
            "--config",
            "cxr/configs/tiny.yaml",
            "--name",
            "two",
            *TINY,
            "train.epochs=4",
            "train.max_steps=16",
        ]
    )
    profile = submit.get_profile("cpu-local")
    [job] = submit.submit_plan(submit.plan_train(args, profile), args, profile)
    log = runs / "two" / "train.log"
    wait_for_text(log, " step 3 ", timeout=240)
    job._interrupt()
    results = job.results()
    assert [r["status"] for r in results] == ["finished", "finished"]
    assert sorted(r["rank"] for r in results) == [0, 1] and {r["world_size"] for r in results} == {2}
    assert results[0]["requeues"] == 1
    text = log.read_text()
    assert "start: 2 rank(s)" in text and "stopped by SIG" in text
    assert "DIVERGED" not in text, "the two ranks ended with different weights after the resume"
    assert f"resumed from {runs / 'two' / 'checkpoints' / 'last'}" in text
    wait_jobs([job.job_id], timeout=60)  # results exist a moment before Slurm calls the job complete
    assert [r["State"] for r in sacct(job.job_id)] == ["REQUEUED", "COMPLETED"]
    meta = json.loads((runs / "two" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["global_step"] == 16
