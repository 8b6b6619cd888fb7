"""Submit training runs, ensembles and resolution ablations with submitit.

    python -m launch.submit train    --cluster slurm --profile g5.24xlarge --shards DIR --runs DIR \\
                                     [--config cxr/configs/X.yaml] [key=value ...]
    python -m launch.submit ensemble --cluster slurm --ensemble default --shards DIR --runs DIR
    python -m launch.submit ablate   --cluster slurm --config C --resolutions 224 512 1024 [--seeds 0 1] \\
                                     [--grid loss.name=bce,focal] --shards DIR --runs DIR

``--cluster slurm`` submits with sbatch (one submitit task per training process,
``--profile`` from launch/profiles.py); ``local`` runs the same tasks as local
processes (submitit's LocalExecutor); ``debug`` runs them in this process.

Inside the job every task runs training through ``cxr.train.main``; how it gets its
distributed environment and how preemption saves and requeues: launch/tasks.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cxrbase.errors import CxrError, cli_entry
from launch.plans import (  # noqa: F401  (parse_grid, sweep_points, PROBE_KEYS: re-exported)
    PROBE_KEYS,
    Plan,
    parse_grid,
    plan_ablate,
    plan_ensemble,
    plan_train,
    sweep_points,
)
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
from launch.tasks import (  # noqa: F401  (re-exported: jobs pickled before the split name launch.submit's)
    AblationReportTask,
    EvaluateTask,
    ProbedTrainTask,
    TrainTask,
    export_distributed_env,
    last_checkpoint,
    probe_overrides,
)

CLUSTERS = ("slurm", "local", "debug")


# ------------------------------------------------------------------ submitting ----


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common_arguments()
    p = sub.add_parser("train", parents=[common], help="one training run")
    p.add_argument("--config", help="training config (cxr/configs/*.yaml)")
    p.add_argument("--evaluate", action="store_true", help="also evaluate the run after it finishes")
    p = sub.add_parser("ensemble", parents=[common], help="ensemble members as an array, then the evaluator")
    p.add_argument("--ensemble", default="default", help="ensemble config: name in launch/ensembles/ or a path")
    _add_ablate(sub, common)
    return parser


def _common_arguments() -> argparse.ArgumentParser:
    """The options every command takes (cluster, profile, shards, runs, report, overrides)."""
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
    return common


def _add_ablate(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ablate command: the sweep's axes, the effective batch, the memory probe and the report."""
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
