"""What runs inside a job that launch.submit submitted: the training, evaluation and ablation-report
tasks (submitit pickles them into the job), the distributed environment they export and how
submitit's preemption signal reaches training.

Every task calls ``cxr.train.main(argv)`` with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT / LOCAL_RANK exported from submitit's environment; training sets up
its process group from them and never knows how it was started. Preemption:
submitit's signal (USR2, ``signal_seconds`` before the time limit or from
``job._interrupt()``) is handed to training as SIGUSR1; every rank saves
``checkpoints/last`` at the next step and returns the requeue status (75); then
submitit calls :meth:`TrainTask.checkpoint`, which returns the same task resuming
from the ``last`` checkpoint training wrote (found with ``cxr.runs.checkpoint``), and
requeues the job.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cxr.runs.run_log import EXIT_REQUEUE  # no torch import: submitting stays light
from cxrbase.errors import CxrError
from launch.members import RESUME

RESUME_KEY = RESUME.split("=")[0]


class _Preemption:
    """Routes submitit's preemption signal into training's own stop request (SIGUSR1).

    submitit's handler would checkpoint from inside a signal handler on rank 0 only;
    training instead stops every rank at the same step boundary after saving
    ``last``. A signal that arrives before training has installed its handler is
    kept and delivered as soon as it has."""

    def __init__(self) -> None:
        import submitit

        self.signum = submitit.JobEnvironment._usr_sig()
        self.submitit_handler = signal.getsignal(self.signum)
        self.pending = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._deliver, name="preemption", daemon=True)

    def __enter__(self) -> _Preemption:
        signal.signal(self.signum, lambda signum, frame: self.pending.set())
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()
        signal.signal(self.signum, signal.SIG_IGN)  # a late repeat must not re-enter the requeue

    def _deliver(self) -> None:
        while not self.done.wait(0.2):
            if self.pending.is_set() and callable(signal.getsignal(signal.SIGUSR1)):
                self.pending.clear()
                os.kill(os.getpid(), signal.SIGUSR1)


# A job's rendezvous port comes from its id, so every task computes the same one without talking, and lies
# below Linux's default ephemeral range (32768–60999, /proc/sys/net/ipv4/ip_local_port_range), where any outgoing
# connection on the node may be holding it at that moment. submitit's own choice (20000–60000 from the id) falls
# there about two times in three: a 2-task job failed with EADDRINUSE while other processes on the node had
# connections open.
# slurm/run-training.sh computes the same port (tests/test_launch.py compares the two).
RENDEZVOUS_PORTS = range(20000, 32768)


def rendezvous_port(job_id: int) -> int:
    """The MASTER_PORT of Slurm job ``job_id`` (its SLURM_JOB_ID; an array task has its own)."""
    return RENDEZVOUS_PORTS[job_id % len(RENDEZVOUS_PORTS)]


def export_distributed_env() -> tuple[int, int]:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from submitit; returns (rank, world)."""
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (e.g. called directly)
        return 0, 1
    if job.num_tasks > 1:
        # one port per job, replacing any MASTER_PORT the submitting shell passed on (two jobs on a node would share it)
        os.environ["MASTER_PORT"] = str(rendezvous_port(int(job.raw_job_id)))
        # Training and accelerate pick the device from LOCAL_RANK; keep every GPU visible.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return job.global_rank, job.num_tasks


def _call_main(module: str, argv: list[str]) -> int:
    """``module.main(argv)`` as an int status, also when it exits through SystemExit."""
    import importlib

    try:
        return int(importlib.import_module(module).main(argv) or 0)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The ``last`` checkpoint folder training wrote in ``run_dir`` (cxr.runs.checkpoint decides the name)."""
    from cxr.runs.checkpoint import find_checkpoint

    return find_checkpoint(run_dir, "last")


@dataclass
class TrainTask:
    """One rank of one training run: a picklable callable for submitit (``checkpoint()`` requeues)."""

    argv: list[str]
    run_dir: str
    requeues: int = 0

    def __call__(self) -> dict[str, Any]:
        rank, world = export_distributed_env()
        with _Preemption() as preemption:
            status = _call_main("cxr.train", self.argv)
        if status == 0:
            return {
                "run_dir": self.run_dir,
                "status": "finished",
                "rank": rank,
                "world_size": world,
                "requeues": self.requeues,
            }
        if status != EXIT_REQUEUE:
            raise CxrError(
                f"{self.run_dir}: training exited with status {status} on rank {rank} — "
                f"see {self.run_dir}/train.log and the submitit logs"
            )
        if callable(preemption.submitit_handler):
            # submitit's own path: rank 0 calls checkpoint(), dumps it, requeues, exits.
            preemption.submitit_handler(preemption.signum, None)
            return {"run_dir": self.run_dir, "status": "requeued", "rank": rank}
        return self.checkpoint().result()  # no scheduler (debug): resume in this process

    def checkpoint(self, *args: Any, **kwargs: Any):
        """The same run, resuming from the ``last`` checkpoint training saved (``submitit.helpers.DelayedSubmission``)."""
        import submitit

        last = last_checkpoint(self.run_dir)
        argv = [a for a in self.argv if not a.startswith(f"{RESUME_KEY}=")]
        argv.append(f"{RESUME_KEY}={last}" if last is not None else RESUME)
        return submitit.helpers.DelayedSubmission(replace(self, argv=argv, requeues=self.requeues + 1))


@dataclass
class ProbedTrainTask(TrainTask):
    """A sweep run: before training, the memory probe (cxr.training.probe) picks micro-batch × accumulation
    for this resolution on the job's own device; rank 0 writes RUN/probe.json, a requeued job
    reuses it (same config, so resume finds its checkpoint)."""

    probe: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> dict[str, Any]:
        if self.probe and not any(a.startswith("data.batch_size=") for a in self.argv):
            rank, _ = export_distributed_env()
            self.argv = [*self.argv, *probe_overrides(Path(self.run_dir), self.probe, rank)]
        return super().__call__()


def probe_overrides(run_dir: Path, spec: dict[str, Any], rank: int = 0, timeout_s: float = 1800) -> list[str]:
    """The probe's training overrides: measured on rank 0 (RUN/probe.json), read by the others."""
    import time

    from cxr.training.probe import PROBE_FILE, choose, read_probe, write_probe

    path = run_dir / PROBE_FILE
    if not path.is_file() and rank == 0:
        result = choose(
            spec.get("config"),
            spec.get("overrides", []),
            int(spec["resolution"]),
            int(spec["effective_batch"]),
            fraction=float(spec.get("fraction", 0.9)),
            budget_mb=spec.get("budget_mb"),
            overhead_mb=spec.get("overhead_mb"),
        )
        write_probe(run_dir, result)
        differs = result.differs_from_config()
        print(
            f"probe {run_dir.name} on {result.device}: {result.reason}"
            + (f"; confirmed by one step: {result.confirmed_mb:.0f} MB" if result.confirmed_mb else "")
            + (f" — differs from the config: {differs}" if differs else ""),
            flush=True,
        )
    deadline = time.monotonic() + timeout_s
    while not path.is_file():  # the other ranks wait for rank 0's probe
        if time.monotonic() > deadline:
            raise CxrError(f"{path}: rank 0's memory probe did not finish in {timeout_s:.0f} s — see its log")
        time.sleep(0.5)
    return read_probe(run_dir).overrides()


@dataclass
class AblationReportTask:
    """``python -m cxr.tools.ablation report`` (argv) as a submitit callable."""

    argv: list[str]
    report: str

    def __call__(self) -> dict[str, Any]:
        status = _call_main("cxr.tools.ablation", self.argv)
        if status != 0:
            raise CxrError(f"{self.report}: ablation report exited with status {status} — see the submitit logs")
        return {"report": self.report, "status": "finished"}


@dataclass
class EvaluateTask:
    """The evaluator (``python -m cxr.evaluate`` argv) as a submitit callable."""

    argv: list[str]
    report: str

    def __call__(self) -> dict[str, Any]:
        with _Preemption() as preemption:  # the preemption signal stops the evaluation (exit 75), nothing written
            status = _call_main("cxr.evaluate", self.argv)
        if status == EXIT_REQUEUE and callable(preemption.submitit_handler):
            preemption.submitit_handler(preemption.signum, None)  # submitit requeues checkpoint(): the same job
            return {"report": self.report, "status": "requeued"}
        if status != 0:
            raise CxrError(f"{self.report}: evaluation exited with status {status} — see the submitit logs")
        return {"report": self.report, "status": "finished"}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """The same evaluation again (it wrote nothing when stopped): ``submitit.helpers.DelayedSubmission``."""
        import submitit

        return submitit.helpers.DelayedSubmission(replace(self))
