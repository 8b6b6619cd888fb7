"""launch/: cluster profiles, ensemble configs, the submitit task (checkpoint/requeue), debug and local runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from helpers import build_synth_shards

from cxrbase.errors import CxrError
from launch import members, profiles, submit, tasks

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    return build_synth_shards(tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------- profiles ----


def test_profiles_table_matches_the_machines():
    g5 = profiles.get_profile("g5.24xlarge")
    # AWS g5.24xlarge: 4 A10G, 96 vCPUs, 384 GiB — the job must fit inside it.
    assert (g5.nodes, g5.gpus_per_node, g5.processes_per_node) == (1, 4, 4)
    assert g5.cpus_per_process * g5.processes_per_node <= 96
    assert g5.workers_per_process < g5.cpus_per_process
    assert g5.mem_gb_per_node <= 384
    multi = [p for p in profiles.PROFILES.values() if p.nodes > 1 and p.gpus_per_node]
    assert multi, "a multi-node GPU profile"
    local = profiles.get_profile("cpu-local")
    assert local.gpus_per_node == 0 and local.processes_per_node * local.cpus_per_process <= os.cpu_count()
    for p in profiles.PROFILES.values():
        assert (ROOT / p.accelerate_config).is_file(), p.accelerate_config


def test_profile_maps_to_sbatch_and_submitit():
    g5 = profiles.get_profile("g5.24xlarge")
    args = profiles.sbatch_args(g5)
    assert "--gpus-per-node=4" in args and "--cpus-per-task=88" in args and "--ntasks-per-node=1" in args
    params = profiles.submitit_parameters(g5)
    assert params["tasks_per_node"] == 4 and params["gpus_per_node"] == 4 and params["cpus_per_task"] == 22


def test_profile_site_overrides(monkeypatch):
    monkeypatch.setenv("CXR_PARTITION", "gpu")
    monkeypatch.setenv("CXR_ACCOUNT", "lab")
    p = profiles.get_profile("g5.24xlarge")
    assert "--partition=gpu" in profiles.sbatch_args(p)
    assert profiles.submitit_parameters(p)["slurm_partition"] == "gpu"
    assert profiles.submitit_parameters(p)["slurm_additional_parameters"] == {"account": "lab"}
    changed = profiles.override_profile(p, ["nodes=2", "qos=high"])
    assert changed.nodes == 2 and changed.qos == "high"
    with pytest.raises(CxrError, match="key=value"):
        profiles.override_profile(p, ["gpus=3"])
    with pytest.raises(CxrError, match="unknown"):
        profiles.get_profile("no-such-machine")


# ---------------------------------------------------------------- ensembles ----


def test_default_ensemble_is_the_five_member_recipe():
    ens = members.load_ensemble("default")
    assert len(ens.members) == 5
    seeds = [m.overrides["train.seed"] for m in ens.members]
    assert len(set(seeds)) == 5
    assert ens.overrides["model.name"] == "densenet121"
    assert ens.overrides["loss.name"] == "dynamic_weighted_bce"


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_member_argv_is_understood_by_training(name, tmp_path):
    """Every key the launchers set must be a key of the real training config."""
    from cxr.config import load_config

    ens = members.load_ensemble(name)
    config = ROOT / ens.config
    if not config.is_file():
        pytest.skip(f"{ens.config} not in the tree yet")
    for i, member in enumerate(ens.members):
        argv = members.member_argv(ens, i, tmp_path / "runs", tmp_path / "shards", ["train.max_steps=3"])
        assert argv[:2] == ["--config", ens.config]
        cfg = load_config(str(config), argv[2:])
        assert Path(cfg.checkpoint.run_dir) == tmp_path / "runs" / member.name
        assert Path(cfg.data.shards) == tmp_path / "shards"
        assert cfg.checkpoint.resume == "auto" and cfg.train.max_steps == 3
        assert cfg.train.seed == member.overrides["train.seed"]


def test_members_cli_prints_argv_lines(capsys):
    assert members.main(["tiny", "--argv", "1", "--runs", "/r", "--set", "train.epochs=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "checkpoint.run_dir=/r/seed2" in lines and lines[-1] == "train.epochs=2"
    assert members.main(["tiny", "--count"]) == 0
    assert capsys.readouterr().out.strip() == "2"


def test_bad_ensemble_configs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: x.yaml\nmembers: [{name: a}, {name: a}]\n")
    with pytest.raises(CxrError, match="repeat"):
        members.load_ensemble(bad)
    with pytest.raises(CxrError, match="no such ensemble"):
        members.load_ensemble("nope")


def test_requeue_status_is_ex_tempfail_everywhere():
    """Training's "requeue me" status is sysexits' EX_TEMPFAIL, and the sbatch wrapper's default matches it."""
    import re

    from cxr.runs import run_log

    assert run_log.EXIT_REQUEUE == os.EX_TEMPFAIL == 75
    script = (Path(__file__).resolve().parents[1] / "slurm" / "run-training.sh").read_text()
    default = re.search(r"CXR_REQUEUE_STATUS=\$\{CXR_REQUEUE_STATUS:-(\d+)\}", script)
    assert default is not None, "slurm/run-training.sh no longer sets CXR_REQUEUE_STATUS's default"
    assert int(default.group(1)) == run_log.EXIT_REQUEUE


def test_a_jobs_rendezvous_port_is_below_the_ephemeral_range_and_the_same_in_both_launchers(monkeypatch):
    """A 2-task submitit job failed with EADDRINUSE: submitit's port (20000–60000 from the job id) lay in Linux's
    ephemeral range (32768–60999), where any outgoing connection on the node may hold it. launch.tasks and
    slurm/run-training.sh now give a job the same port below that range; a MASTER_PORT the submitting shell
    passed on is replaced (two jobs on one node would share it)."""
    import re

    script = (ROOT / "slurm" / "run-training.sh").read_text()
    [formula] = re.findall(r"^export MASTER_PORT=\$\(\((.+)\)\)$", script, re.M)
    ids = [1, 236, 12767, 12768, 32767, 45000, 9876543]
    by_bash = subprocess.run(
        ["bash", "-c", f"for SLURM_JOB_ID in {' '.join(map(str, ids))}; do echo $(({formula})); done"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [int(p) for p in by_bash] == [tasks.rendezvous_port(i) for i in ids]
    # by hand: 20000 + id mod 12768, i.e. 20000 ≤ port < 32768
    assert [tasks.rendezvous_port(i) for i in ids] == [20001, 20236, 32767, 20000, 27231, 26696, 26879]
    env = {
        "SLURM_JOB_ID": "45000",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "node7",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SUBMITIT_EXECUTOR": "slurm",
        "MASTER_PORT": "29500",  # from the submitting shell
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.setenv(key, "stale")  # so that monkeypatch removes what the export writes
    assert tasks.export_distributed_env() == (1, 2)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["RANK"]) == ("node7", "26696", "1")


def test_an_evaluation_stopped_for_preemption_is_requeued_by_submitit(monkeypatch):
    """Battery 2, 4.7: the evaluator exits 75 (nothing written); under submitit the task hands the
    preemption to submitit's own handler, which requeues checkpoint(): the same evaluation."""
    import submitit

    usr = submitit.JobEnvironment._usr_sig()
    calls = []
    previous = signal.signal(usr, lambda signum, frame: calls.append(signum))  # stands in for submitit's
    monkeypatch.setattr(tasks, "_call_main", lambda module, argv: tasks.EXIT_REQUEUE)
    task = tasks.EvaluateTask(argv=["--runs", "r", "--shards", "s", "--out", "o"], report="o")
    try:
        assert task() == {"report": "o", "status": "requeued"}
    finally:
        signal.signal(usr, previous)
    assert calls == [usr]
    again = task.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function == task
    monkeypatch.setattr(tasks, "_call_main", lambda module, argv: 2)
    with pytest.raises(CxrError, match="o: evaluation exited with status 2"):
        task()


# ------------------------------------------------------- checkpoint / resume ----


def _tiny_argv(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "cxr/configs/tiny.yaml",
        f"data.shards={shards}",
        f"checkpoint.run_dir={run_dir}",
        "checkpoint.resume=auto",
        "data.resolution=64",
        "model.stem_size=64",
        "data.num_threads=0",
        "logging.progress=false",
        "logging.log_every=1",
        *extra,
    ]


@pytest.mark.slow
def test_checkpoint_resumes_from_the_checkpoint_training_wrote(synth_shards, tmp_path, monkeypatch):
    """MAE's bug was a requeue looking for a checkpoint name training never writes.

    Preempt a real (in-process) run with submitit's signal; the task must stop, and
    checkpoint() must point at the folder that holds what training saved — found here
    by listing the run dir, not by asking the code under test — and the resumed run
    must say it resumed from there."""
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    task = tasks.TrainTask(_tiny_argv(synth_shards, run_dir, "train.epochs=3", "train.max_steps=8"), str(run_dir))
    log = run_dir / "train.log"
    import logging

    import submitit

    sig = submitit.JobEnvironment._usr_sig()
    sent = []

    def preempt_at_step_2(record: logging.LogRecord) -> bool:
        # The event itself: training logs its step-2 line, and submitit's signal is sent from
        # inside that call, before the step's stop check; the call returns once the task has
        # relayed it to training's own SIGUSR1 handler. Training then stops at step 2, always.
        if sent or not record.getMessage().startswith("step 2 "):
            return True
        sent.append(record.getMessage())
        stop_handler, relayed = signal.getsignal(signal.SIGUSR1), threading.Event()

        def relay(signum, frame):
            stop_handler(signum, frame)
            relayed.set()

        signal.signal(signal.SIGUSR1, relay)
        try:
            os.kill(os.getpid(), sig)
            assert relayed.wait(30), "the task did not relay submitit's signal to training"
        finally:
            signal.signal(signal.SIGUSR1, stop_handler)
        return True

    steps = logging.getLogger("cxr.train.steps")  # setup_logging resets handlers, not filters
    steps.addFilter(preempt_at_step_2)
    try:
        result = task()  # no scheduler: the task resumes in-process through checkpoint()
    finally:
        steps.removeFilter(preempt_at_step_2)
    assert len(sent) == 1
    assert result["status"] == "finished" and result["requeues"] == 1

    saved = [p.parent for p in (run_dir / "checkpoints").glob("*/state.pt")]
    assert saved == [run_dir / "checkpoints" / "last"]
    text = log.read_text()
    assert "stopped by SIGUSR1 at epoch 1 step 2 (global step 2)" in text
    assert f"resumed from {run_dir / 'checkpoints' / 'last'}" in text
    # and checkpoint() names exactly that folder
    delayed = task.checkpoint()
    assert f"checkpoint.resume={run_dir / 'checkpoints' / 'last'}" in delayed.function.argv
    import json

    assert json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())["global_step"] == 8


def test_checkpoint_without_a_saved_checkpoint_starts_over(tmp_path):
    task = tasks.TrainTask(["checkpoint.resume=auto", "x=1"], str(tmp_path / "none"))
    delayed = task.checkpoint()
    assert delayed.function.argv == ["x=1", "checkpoint.resume=auto"]
    assert delayed.function.requeues == 1


@pytest.mark.slow
def test_submit_local_two_processes(synth_shards, tmp_path, monkeypatch):
    """`--cluster local`: submitit's LocalExecutor starts 2 tasks that form one 2-rank run."""
    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs"
    rc = submit.main(
        [
            "train",
            "--cluster",
            "local",
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
            "--wait",
            "data.resolution=64",
            "model.stem_size=64",
            "logging.progress=false",
            "train.epochs=1",
            "train.max_steps=2",
        ]
    )
    assert rc == 0
    text = (runs / "two" / "train.log").read_text()
    assert "start: 2 rank(s)" in text and "done:" in text
    assert (runs / "two" / "checkpoints" / "last" / "model.safetensors").is_file()


# ------------------------------------------------------------- profiles as data ----
# The table as it stood in launch/profiles.py before it became launch/profiles.yaml
# (copied by hand); g5.24xlarge's memory and CPUs changed on purpose (schedulable).
OLD_TABLE = {
    "g5.24xlarge": dict(
        nodes=1,
        processes_per_node=4,
        gpus_per_node=4,
        cpus_per_process=24,
        mem_gb_per_node=360,
        time_min=1440,
        accelerate_config="launch/configs/g5.24xlarge.yaml",
        workers_per_process=16,
        threads_per_process=4,
        mixed_precision="bf16",
        signal_seconds=300,
    ),
    "p4d.24xlarge-x2": dict(
        nodes=2,
        processes_per_node=8,
        gpus_per_node=8,
        cpus_per_process=12,
        mem_gb_per_node=1000,
        time_min=1440,
        accelerate_config="launch/configs/multinode.yaml",
        workers_per_process=8,
        threads_per_process=2,
        mixed_precision="bf16",
        signal_seconds=300,
    ),
    "cpu-local": dict(
        nodes=1,
        processes_per_node=2,
        gpus_per_node=0,
        cpus_per_process=1,
        mem_gb_per_node=4,
        time_min=60,
        accelerate_config="launch/configs/cpu-2proc.yaml",
        workers_per_process=0,
        threads_per_process=1,
        mixed_precision="no",
        signal_seconds=60,
    ),
}
CHANGED = {"g5.24xlarge": {"cpus_per_process": 22, "mem_gb_per_node": 0}}


@pytest.mark.parametrize("name", sorted(OLD_TABLE))
def test_profiles_from_yaml_match_the_old_table(name, monkeypatch):
    monkeypatch.delenv("CXR_PROFILES", raising=False)
    p = profiles.load_profiles()[name]
    want = {**OLD_TABLE[name], **CHANGED.get(name, {})}
    assert {k: getattr(p, k) for k in want} == want
    assert (p.partition, p.account, p.qos, p.constraint) == ("", "", "", "")
    # the evaluator keeps its old size: the old rule was mem_gb_per_node // processes_per_node, at least 2
    old = OLD_TABLE[name]
    assert profiles.eval_mem_gb(p) == max(2, old["mem_gb_per_node"] // old["processes_per_node"])


def test_g5_is_schedulable_whole_node():
    g5 = profiles.get_profile("g5.24xlarge")
    args = profiles.sbatch_args(g5)
    assert "--mem=0" in args and "--cpus-per-task=88" in args  # 88 of 96 vCPUs, all node memory
    params = profiles.submitit_parameters(g5)
    assert params["slurm_mem"] == "0" and "mem_gb" not in params and params["cpus_per_task"] == 22


def test_single_node_8gpu_profile():
    p = profiles.get_profile("gpu8-1node")
    assert (p.nodes, p.gpus_per_node, p.processes_per_node) == (1, 8, 8)
    assert p.cpus_per_process * 8 <= 96 - 8 and p.workers_per_process < p.cpus_per_process
    cfg = yaml.safe_load((ROOT / p.accelerate_config).read_text())
    assert (cfg["num_machines"], cfg["num_processes"], cfg["distributed_type"]) == (1, 8, "MULTI_GPU")


def test_site_file_adds_and_overrides_profiles(tmp_path, monkeypatch):
    site = tmp_path / "site.yaml"
    site.write_text(
        "g5.24xlarge:\n  partition: gpu-a10g\n  time_min: 600\n  env: {GLOO_SOCKET_IFNAME: ens5}\n"
        "mine:\n  base: p4d.24xlarge-x2\n  nodes: 4\n  env: {NCCL_DEBUG: INFO}\n"
    )
    monkeypatch.setenv("CXR_PROFILES", str(site))
    table = profiles.load_profiles([site])
    g5 = table["g5.24xlarge"]
    assert (g5.partition, g5.time_min, g5.cpus_per_process) == ("gpu-a10g", 600, 22)
    assert g5.env == {"CXR_CACHE_DIR": "/scratch/cxr-cache", "GLOO_SOCKET_IFNAME": "ens5"}  # merged key by key
    mine = table["mine"]
    assert (mine.nodes, mine.gpus_per_node, mine.mem_gb_per_node) == (4, 8, 1000)
    assert mine.env["NCCL_DEBUG"] == "INFO" and mine.env["FI_PROVIDER"] == "efa"  # merged over the base's env
    # through the CLI's --profiles, and the variables a site already exports win over the profile's
    exports = subprocess.run(
        [sys.executable, "-m", "launch.profiles", "mine", "--env", "--profiles", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = subprocess.run(
        ["bash", "-c", exports + "\necho $NCCL_DEBUG $FI_PROVIDER"],
        capture_output=True,
        text=True,
        env={"FI_PROVIDER": "tcp", "PATH": "/usr/bin:/bin"},
    ).stdout.split()
    assert out == ["INFO", "tcp"]


def test_site_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("x:\n  nodes: 1\n")
    with pytest.raises(CxrError, match=r"bad.yaml: profile 'x' lacks"):
        profiles.load_profiles([bad])
    bad.write_text("g5.24xlarge:\n  gpus: 3\n")
    with pytest.raises(CxrError, match=r"bad.yaml: profile 'g5.24xlarge': unknown field"):
        profiles.load_profiles([bad])


# ------------------------------------------------------- run-training.sh's requeue decision ----
# srun and scontrol are replaced by stubs on PATH: "training" writes RUN/status.json through the real
# writer (cxr.runs.run_log.write_status, which records $CXR_RUN_NONCE) and exits 1 as accelerate would.
_FAKE_SRUN = """#!/usr/bin/env bash
case $FAKE_TRAINING in
  preempt) "$CXR_PYTHON" -c 'import os, sys; from pathlib import Path; sys.path.insert(0, os.getcwd())
from cxr.training.state import TrainState; from cxr.runs.run_log import write_status
write_status(Path(os.environ["FAKE_RUN"]), "preempted", TrainState(epoch=1), exit_code=75)' || exit 9
           [[ -z ${FAKE_SKEW:-} ]] || touch -d "@$(( $(date +%s) - FAKE_SKEW ))" "$FAKE_RUN/status.json" ;;
  crash) ;;  # killed (OOM, node lost) before writing anything
esac
exit 1
"""
_FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
  show) echo localhost ;;
  requeue) echo "$2" >> "$FAKE_REQUEUES" ;;
esac
"""


def _run_training_sh(tmp_path: Path, run: Path, training: str, restart: int, **env) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    requeues = tmp_path / "requeues.txt"
    requeues.unlink(missing_ok=True)
    full = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_RESTART_COUNT": str(restart),
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "CXR_REPO": str(ROOT),
        "CXR_PYTHON": sys.executable,
        "FAKE_TRAINING": training,
        "FAKE_RUN": str(run),
        "FAKE_REQUEUES": str(requeues),
        **env,
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / "run-training.sh"), f"checkpoint.run_dir={run}"],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    return proc.returncode, requeues.read_text().split() if requeues.is_file() else [], proc.stdout + proc.stderr


def test_run_training_requeues_on_its_own_preempted_status_whatever_the_clocks(tmp_path):
    """Battery 2, 13.7: a status.json whose mtime (file-server clock) is 30 s behind the node's
    clock counted as stale under the old mtime test, and the preempted job was not requeued."""
    run = tmp_path / "run"
    run.mkdir()
    rc, requeued, out = _run_training_sh(tmp_path, run, "preempt", 2, FAKE_SKEW="30")
    assert json.loads((run / "status.json").read_text())["nonce"] == "4242.2"
    assert (rc, requeued) == (0, ["4242"]), out
    assert "requeueing 4242" in out


def test_run_training_does_not_requeue_on_an_older_starts_preempted_status(tmp_path):
    """13.8: with TMPDIR unwritable the old script's failed mktemp made any old "preempted" count as
    fresh: a start that crashed before writing its own status was requeued again and again."""
    run = tmp_path / "run"
    run.mkdir()
    assert _run_training_sh(tmp_path, run, "preempt", 0)[:2] == (0, ["4242"])  # restart 0 stopped to requeue
    unwritable = tmp_path / "no-such-dir"
    rc, requeued, out = _run_training_sh(tmp_path, run, "crash", 1, TMPDIR=str(unwritable))
    assert json.loads((run / "status.json").read_text())["nonce"] == "4242.0"  # still restart 0's record
    assert (rc, requeued) == (1, []), out
    (run / "status.json").write_text('{"state": "preempted", "epoch": 1}\n')  # written before nonces: not ours
    assert _run_training_sh(tmp_path, run, "crash", 1)[:2] == (1, [])
