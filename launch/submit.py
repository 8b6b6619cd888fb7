"""Submit training runs, ensembles and resolution ablations with submitit.

    python -m launch.submit train    --cluster slurm --profile g5.24xlarge --shards DIR --runs DIR \\
                                     [--config cxr/configs/X.yaml] [key=value ...]
    python -m launch.submit ensemble --cluster slurm --ensemble default --shards DIR --runs DIR
    python -m launch.submit ablate   --cluster slurm --config C --resolutions 224 512 1024 [--seeds 0 1] \\
                                     [--grid loss.name=bce,focal] --shards DIR --runs DIR

``--cluster slurm`` submits with sbatch (one submitit task per training process,
``--profile`` from launch/profiles.py); ``local`` runs the same tasks as local
processes (submitit's LocalExecutor); ``debug`` runs them in this process.

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

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cxr.runs.run_log import EXIT_REQUEUE  # no torch import: submitting stays light
from cxrbase.errors import CxrError, cli_entry
from launch.members import RESUME, RUN_DIR_KEY, SHARDS_KEY, load_ensemble, member_argv
from launch.profiles import (
    DEFAULT_PROFILE,
    Profile,
    env_exports,
    eval_mem_gb,
    get_profile,
    override_profile,
    submitit_parameters,
    use_profile_files,
)

RESUME_KEY = RESUME.split("=")[0]
CLUSTERS = ("slurm", "local", "debug")


# ------------------------------------------------------------------ in the job ----


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


def export_distributed_env() -> tuple[int, int]:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from submitit; returns (rank, world)."""
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (e.g. called directly)
        return 0, 1
    if job.num_tasks > 1:
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


# ------------------------------------------------------------------ submitting ----


@dataclass
class Plan:
    """What to submit: training runs (name → argv) and evaluations (report → runs)."""

    runs: dict[str, list[str]]
    run_dirs: dict[str, Path]
    evaluations: list[tuple[Path, list[str], list[str]]] = field(default_factory=list)
    """(report dir, member names it needs, extra evaluate options)."""
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Run name → memory-probe spec (ablate): micro-batch × accumulation chosen in the job."""
    ablation_report: tuple[Path, list[str]] | None = None
    """(report dir, extra `cxr.tools.ablation report` options) after every run (ablate)."""


def make_executor(
    cluster: str, folder: Path, profile: Profile, processes: int | None = None, name: str = "cxr", **extra: Any
):
    """A submitit executor sized by ``profile`` (debug: one in-process task)."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = submitit_parameters(profile, processes)
    if cluster == "debug":
        params = {"timeout_min": params["timeout_min"]}
    if cluster == "local":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    additional = {**params.pop("slurm_additional_parameters", {}), **extra.pop("slurm_additional_parameters", {})}
    if additional and cluster == "slurm":
        params["slurm_additional_parameters"] = additional
    if profile.env and cluster == "slurm":  # NCCL/EFA/gloo networking, in the sbatch script
        params["slurm_setup"] = env_exports(profile)
    executor.update_parameters(name=name, **params, **extra)
    return executor


def _eval_profile(profile: Profile) -> Profile:
    return replace(
        profile,
        nodes=1,
        processes_per_node=1,
        gpus_per_node=min(profile.gpus_per_node, 1),
        mem_gb_per_node=eval_mem_gb(profile),
    )


def submit_plan(plan: Plan, args: argparse.Namespace, profile: Profile) -> list[Any]:
    """Submit the runs (as one array) and the evaluations after them; print ids and paths."""
    logs = Path(args.logs or Path(args.runs) / "submitit")
    train_ex = make_executor(args.cluster, logs / "%j", profile, args.processes, name=f"cxr-{args.name}")
    names = list(plan.runs)

    def task(n: str) -> TrainTask:
        if n in plan.probes:
            return ProbedTrainTask(plan.runs[n], str(plan.run_dirs[n]), probe=plan.probes[n])
        return TrainTask(plan.runs[n], str(plan.run_dirs[n]))

    if args.cluster == "slurm" and len(names) > 1:
        with train_ex.batch():
            jobs = [train_ex.submit(task(n)) for n in names]
    else:
        jobs = [train_ex.submit(task(n)) for n in names]
    by_name = dict(zip(names, jobs))
    for name, job in by_name.items():
        print(f"train {name}: job {job.job_id} -> {plan.run_dirs[name]}")
    eval_jobs = []
    for report, needs, extra in plan.evaluations:
        eval_argv = [
            "--runs",
            *(str(plan.run_dirs[n]) for n in needs),
            "--shards",
            str(args.shards),
            "--split",
            args.split,
            "--out",
            str(report),
            *extra,
        ]
        dependency = {}
        if args.cluster == "slurm":
            ids = sorted(
                {by_name[n].job_id.split("_")[0] if len(needs) == len(names) else by_name[n].job_id for n in needs}
            )
            dependency = {
                "slurm_additional_parameters": {"dependency": "afterok:" + ":".join(ids), "kill_on_invalid_dep": "yes"}
            }
        else:  # no scheduler to hold the evaluator: wait here for its members
            for n in needs:
                by_name[n].results()
        ex = make_executor(
            args.cluster, logs / "%j", _eval_profile(profile), name=f"cxr-{args.name}-evaluate", **dependency
        )
        job = ex.submit(EvaluateTask(eval_argv, str(report)))
        print(f"evaluate {report.name}: job {job.job_id} after {', '.join(needs)} -> {report}")
        eval_jobs.append(job)
    if plan.ablation_report is not None:
        eval_jobs.append(_submit_ablation_report(plan, args, profile, logs, jobs))
    print(f"logs: {logs}")
    return jobs + eval_jobs


def _submit_ablation_report(plan: Plan, args: argparse.Namespace, profile: Profile, logs: Path, jobs: list) -> Any:
    """The sweep's report after all its runs (Slurm: afterok dependency; else: wait here)."""
    report, extra = plan.ablation_report
    argv = [
        "report",
        "--runs",
        *(str(plan.run_dirs[n]) for n in plan.runs),
        "--shards",
        str(args.shards),
        "--split",
        args.split,
        "--out",
        str(report),
        *extra,
    ]
    dependency = {}
    if args.cluster == "slurm":
        ids = sorted({j.job_id.split("_")[0] for j in jobs})
        dependency = {
            "slurm_additional_parameters": {"dependency": "afterok:" + ":".join(ids), "kill_on_invalid_dep": "yes"}
        }
    else:
        for job in jobs:
            job.results()
    ex = make_executor(
        args.cluster, logs / "%j", _eval_profile(profile), name=f"cxr-{args.name}-ablation", **dependency
    )
    job = ex.submit(AblationReportTask(argv, str(report)))
    print(f"ablation report: job {job.job_id} after {len(jobs)} run(s) -> {report / 'ablation.md'}")
    if args.cluster == "debug":  # debug jobs run when their result is asked for
        job.result()
    return job


def _base_overrides(args: argparse.Namespace, profile: Profile) -> list[str]:
    """Overrides every run gets: the profile's loader/thread sizes, then the user's key=value."""
    extra = [
        f"data.num_threads={profile.workers_per_process}",
        f"train.threads={profile.threads_per_process}",
        f"train.mixed_precision={profile.mixed_precision}",
    ]
    return extra + list(args.overrides)


def plan_train(args: argparse.Namespace, profile: Profile) -> Plan:
    run_dir = Path(args.runs) / args.name
    argv = (["--config", args.config] if args.config else []) + [
        f"{SHARDS_KEY}={args.shards}",
        f"{RUN_DIR_KEY}={run_dir}",
        RESUME,
        *_base_overrides(args, profile),
    ]
    plan = Plan({args.name: argv}, {args.name: run_dir})
    if args.evaluate:
        plan.evaluations.append((Path(args.report or run_dir / "report"), [args.name], []))
    return plan


def plan_ensemble(args: argparse.Namespace, profile: Profile) -> Plan:
    ensemble = load_ensemble(args.ensemble)
    args.name = args.name if args.name != "run" else ensemble.name
    runs: dict[str, list[str]] = {}
    dirs: dict[str, Path] = {}
    for i, member in enumerate(ensemble.members):
        runs[member.name] = member_argv(ensemble, i, args.runs, args.shards, _base_overrides(args, profile))
        dirs[member.name] = Path(args.runs) / member.name
    report = Path(args.report or Path(args.runs) / "report")
    return Plan(runs, dirs, [(report, list(runs), ensemble.evaluate)])


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``key=v1,v2`` items → [(key, [v1, v2])] (order kept)."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values or "" in values.split(","):
            raise CxrError(f"--grid {item!r}: expected key=v1,v2 (e.g. loss.name=bce,focal)")
        grid.append((key, values.split(",")))
    return grid


def _setting(args: argparse.Namespace, key: str, default: Any) -> Any:
    """A training setting as the runs will see it: the last ``key=value`` override, else the config's."""
    import yaml

    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith(f"{key}=")]
    return yaml.safe_load(given[-1]) if given else _config_value(args.config, key, default)


def _config_value(config: str | None, key: str, default: Any) -> Any:
    """A value of the training config YAML (without importing torch), or default."""
    if not config:
        return default
    import yaml

    path = Path(config)
    if not path.is_file():
        path = Path(__file__).resolve().parents[1] / "cxr" / "configs" / f"{config}.yaml"
    if not path.is_file():
        raise CxrError(f"{config}: config file not found — pass --config with a YAML file (see cxr/configs/)")
    node: Any = yaml.safe_load(path.read_text()) or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def sweep_points(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """Every (run name, overrides) of the sweep: resolutions × grid values × seeds."""
    import itertools

    axes: list[list[tuple[str, str]]] = []
    if args.resolutions:
        axes.append([(f"res{r}", f"data.resolution={r}") for r in args.resolutions])
    for key, values in parse_grid(args.grid):
        short = key.split(".")[-1]
        axes.append([(f"{short}-{v}", f"{key}={v}") for v in values])
    if args.seeds:
        axes.append([(f"seed{s}", f"train.seed={s}") for s in args.seeds])
    points = []
    for combo in itertools.product(*axes):
        points.append(("_".join(name for name, _ in combo), [o for _, o in combo]))
    return points


PROBE_KEYS = ("model.", "loss.", "train.mixed_precision=", "train.cudnn_benchmark=", "train.deterministic=")
"""The overrides the memory probe sees: the model and its training numerics (the profile's bf16)."""


def plan_ablate(args: argparse.Namespace, profile: Profile) -> Plan:
    """Resolutions (and --grid values) × seeds, same effective batch and schedule; then one report.

    Each run's micro-batch × accumulation is chosen in its job by the memory probe at its
    resolution (``--no-probe``: the config's), so every run takes the same optimizer steps.
    """
    if not args.resolutions and not args.grid:
        args.resolutions = [224, 512, 1024]
    from cxr.data.shard_index import image_source  # no torch: numpy and the manifest reader

    batch = int(_setting(args, "data.batch_size", 16))
    accum = int(_setting(args, "train.grad_accum_steps", 1))
    effective = args.effective_batch or batch * accum
    # a data.batch_size=N override fixes the micro-batch: the job skips the probe (ProbedTrainTask)
    probe = args.probe and not any(o.startswith("data.batch_size=") for o in args.overrides)
    runs: dict[str, list[str]] = {}
    dirs: dict[str, Path] = {}
    plan = Plan(runs, dirs)
    for name, point in sweep_points(args):
        dirs[name] = Path(args.runs) / name
        base = (["--config", args.config] if args.config else []) + [
            f"{SHARDS_KEY}={args.shards}",
            f"{RUN_DIR_KEY}={dirs[name]}",
            RESUME,
            *_base_overrides(args, profile),
            *point,
        ]
        resolution = int(
            next(
                (o.split("=", 1)[1] for o in reversed(base) if o.startswith("data.resolution=")),
                _config_value(args.config, "data.resolution", 224),
            )
        )
        if probe:
            plan.probes[name] = {
                "config": args.config,
                "resolution": resolution,
                "effective_batch": effective,
                "overrides": [o for o in base[2 if args.config else 0 :] if o.startswith(PROBE_KEYS)],
                "fraction": args.probe_fraction,
                "overhead_mb": args.probe_overhead_mb,
            }
            layout = f"micro-batch × accumulation = {effective} chosen by the probe in the job"
        else:
            if effective % batch:
                raise CxrError(
                    f"--effective-batch {effective}: not a multiple of data.batch_size {batch} — "
                    "pick a multiple, or leave the probe on"
                )
            base += [f"train.grad_accum_steps={effective // batch}"]
            layout = f"micro-batch {batch} × accumulation {effective // batch}"
            if args.probe:
                layout += f" (data.batch_size={batch} given: no memory probe)"
        runs[name] = base
        print(f"ablate {name}: {image_source(args.shards, resolution)['source']}; {layout}")
    by = ["data.resolution"] if args.resolutions else []
    by += [key for key, _ in parse_grid(args.grid)]
    plan.ablation_report = (
        Path(args.report or Path(args.runs) / "report"),
        ["--by", *by, "--bootstrap", str(args.bootstrap), *(["--reference", args.reference] if args.reference else [])],
    )
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="slurm",
        help="slurm: sbatch; local: local processes; debug: in this process (default: slurm)",
    )
    common.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help=f"job size from launch/profiles.yaml or a site file (default: {DEFAULT_PROFILE}; "
        "list: python -m launch.profiles)",
    )
    common.add_argument(
        "--profiles",
        action="append",
        default=[],
        metavar="FILE",
        help="site profile file read after launch/profiles.yaml (also CXR_PROFILES; repeatable)",
    )
    common.add_argument(
        "--profile-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one profile field, e.g. nodes=2, partition=gpu, time_min=600 (repeatable)",
    )
    common.add_argument("--processes", type=int, help="training processes per node (default: the profile's)")
    common.add_argument("--shards", required=True, help="shards directory (python -m shards pack)")
    common.add_argument("--runs", required=True, help="folder of the run directories")
    common.add_argument("--report", help="report directory (default: RUNS/report)")
    common.add_argument("--split", default="test", help="split the evaluator reports (default: test)")
    common.add_argument("--logs", help="submitit logs and pickles (default: RUNS/submitit)")
    common.add_argument("--name", default="run", help="run name: its dir is RUNS/NAME (train); job name prefix")
    common.add_argument("--wait", action="store_true", help="wait for every job and print its result")
    common.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides for every run")
    p = sub.add_parser("train", parents=[common], help="one training run")
    p.add_argument("--config", help="training config (cxr/configs/*.yaml)")
    p.add_argument("--evaluate", action="store_true", help="also evaluate the run after it finishes")
    p = sub.add_parser("ensemble", parents=[common], help="ensemble members as an array, then the evaluator")
    p.add_argument("--ensemble", default="default", help="ensemble config: name in launch/ensembles/ or a path")
    p = sub.add_parser(
        "ablate",
        parents=[common],
        help="a sweep (resolutions, --grid, seeds), then one comparison report",
        description="Train one run per resolution × --grid value × seed with the same effective "
        "batch and schedule, then write RUNS/report/ablation.md (python -m cxr.tools.ablation report). "
        "Put key=value overrides before --grid.",
    )
    p.add_argument("--config", help="training config (cxr/configs/*.yaml)")
    p.add_argument(
        "--resolutions",
        type=int,
        nargs="+",
        default=None,
        help="training resolutions (default: 224 512 1024, or none when --grid is given)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per point (default: the config's)")
    p.add_argument(
        "--grid",
        nargs="+",
        default=[],
        metavar="KEY=V1,V2",
        help="also sweep config keys, e.g. loss.name=bce,focal model.name=densenet121,resnet50",
    )
    p.add_argument(
        "--effective-batch",
        type=int,
        default=None,
        help="micro-batch × accumulation of every run (default: the config's batch × accumulation)",
    )
    p.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="keep the config's micro-batch (accumulation from --effective-batch) instead of probing memory",
    )
    p.add_argument(
        "--probe-fraction",
        type=float,
        default=0.9,
        help="share of device memory the probe may fill, non-torch overhead included (0.9)",
    )
    p.add_argument(
        "--probe-overhead-mb",
        type=float,
        default=None,
        help="device memory outside torch per process: CUDA context, NCCL, DALI's pool "
        "(default: cxr.training.probe.CUDA_OVERHEAD_MB on CUDA)",
    )
    p.add_argument("--reference", default=None, help="variant the report compares against (default: the lowest)")
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="paired bootstrap resamples of the report (default 1000)"
    )
    return parser


def debug_layout_note(profile: Profile, processes: int | None = None) -> str | None:
    """What ``--cluster debug`` changes: every job runs in this process as ONE training process."""
    per_node = processes or profile.processes_per_node
    if per_node * profile.nodes == 1:
        return None
    return (
        f"--cluster debug: every job runs in this process as 1 training process, not the {profile.nodes} "
        f"node(s) × {per_node} of profile {profile.name}; its images/s do not compare with runs of that "
        "profile (use --cluster local or slurm for its layout)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for item in args.overrides:
        if "=" not in item:
            raise CxrError(f"{item!r}: training overrides are key=value (e.g. train.epochs=3)")
    args.shards, args.runs = str(Path(args.shards).resolve()), str(Path(args.runs).resolve())
    if args.profiles:
        use_profile_files(args.profiles)
    profile = override_profile(get_profile(args.profile), args.profile_set)
    if args.cluster == "debug":
        note = debug_layout_note(profile, args.processes)
        if note:  # said, so that the runs' images/s are not compared with the profile's
            print(note, flush=True)
        args.processes = 1
    plan = {"train": plan_train, "ensemble": plan_ensemble, "ablate": plan_ablate}[args.command](args, profile)
    jobs = submit_plan(plan, args, profile)
    if args.wait:
        for job in jobs:
            print(f"job {job.job_id}: {job.results()}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
