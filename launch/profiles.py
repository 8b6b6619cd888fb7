"""Cluster profiles: the one table of job sizes used by every launcher.

A profile says how big one training run is (nodes, GPUs, CPUs, memory, wall
time) and where it may run (partition, account, qos, constraint). The submitit
launcher (`launch.submit`) starts one task per GPU (or per CPU process); the
sbatch scripts (`slurm/*.sh`, `slurm/*.sbatch`) start one `accelerate launch` per
node, so the same profile maps to two shapes — see :func:`submitit_parameters`
and :func:`sbatch_args`. Print a profile's sbatch options with
``python -m launch.profiles NAME --sbatch``.

Site-specific fields (partition, account, qos) default to empty and can be
overridden without editing the table: ``CXR_PARTITION``, ``CXR_ACCOUNT``,
``CXR_QOS``, ``CXR_CONSTRAINT`` in the environment, or ``--profile-set key=value``
on ``python -m launch.submit``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from shards.errors import CxrError, cli_entry


@dataclass(frozen=True)
class Profile:
    """The size and placement of one training run on a cluster."""

    name: str
    description: str
    nodes: int
    processes_per_node: int
    """Training processes per node: one per GPU, or CPU processes when gpus_per_node=0."""
    gpus_per_node: int
    cpus_per_process: int
    """CPUs for each process: its DataLoader workers / DALI threads plus the main thread."""
    mem_gb_per_node: int
    time_min: int
    accelerate_config: str
    """accelerate config (repo-relative) for `accelerate launch`; its process count is overridden."""
    workers_per_process: int
    """DataLoader workers (or DALI CPU threads) per process: cpus_per_process minus the main thread, capped."""
    threads_per_process: int
    """OMP/MKL threads per process (torch intra-op), kept small so workers are not starved."""
    mixed_precision: str = "no"
    """Autocast for runs started without `accelerate launch` (submitit): bf16 on A10G/A100."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_seconds: int = 300
    """Seconds before the time limit that Slurm sends USR1 (checkpoint, then requeue)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    def with_site(self, env: dict[str, str] | None = None) -> "Profile":
        """This profile with partition/account/qos/constraint from CXR_* environment variables."""
        env = os.environ if env is None else env
        site = {key: env[f"CXR_{key.upper()}"] for key in ("partition", "account", "qos", "constraint")
                if env.get(f"CXR_{key.upper()}")}
        return dataclasses.replace(self, **site)


PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile(
        name="g5.24xlarge",
        description="AWS g5.24xlarge: 1 node, 4x A10G 24 GB, 96 vCPUs, 384 GiB",
        nodes=1, processes_per_node=4, gpus_per_node=4, cpus_per_process=24,
        mem_gb_per_node=360, time_min=24 * 60,
        accelerate_config="launch/configs/g5.24xlarge.yaml",
        # 1024 px PNG decode is the bottleneck with the torch loader: ~16 workers
        # keep an A10G fed at batch 16; DALI `mixed` needs only ~4 CPU threads.
        workers_per_process=16, threads_per_process=4, mixed_precision="bf16",
    ),
    Profile(
        name="p4d.24xlarge-x2",
        description="2 nodes of AWS p4d.24xlarge: 8x A100 40 GB, 96 vCPUs, 1152 GiB each (EFA)",
        nodes=2, processes_per_node=8, gpus_per_node=8, cpus_per_process=12,
        mem_gb_per_node=1000, time_min=24 * 60,
        accelerate_config="launch/configs/multinode.yaml",
        workers_per_process=8, threads_per_process=2, mixed_precision="bf16",
    ),
    Profile(
        name="cpu-local",
        description="this machine (2 cores, no GPU) on slurm/local-cluster.sh: 2 gloo processes",
        nodes=1, processes_per_node=2, gpus_per_node=0, cpus_per_process=1,
        mem_gb_per_node=4, time_min=60,
        accelerate_config="launch/configs/cpu-2proc.yaml",
        workers_per_process=0, threads_per_process=1,
        signal_seconds=60,
    ),
]}

DEFAULT_PROFILE = "cpu-local"


def get_profile(name: str) -> Profile:
    """The profile called ``name``, with site overrides from the environment applied."""
    if name not in PROFILES:
        raise CxrError(f"profile {name!r}: unknown — choose one of {', '.join(PROFILES)} "
                       "(launch/profiles.py)")
    return PROFILES[name].with_site()


def override_profile(profile: Profile, assignments: Sequence[str]) -> Profile:
    """Apply ``key=value`` overrides (e.g. ``nodes=2``, ``partition=gpu``) to a profile."""
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "name":
            raise CxrError(f"--profile-set {item!r}: expected key=value with key one of "
                           f"{', '.join(k for k in fields if k != 'name')}")
        changes[key] = int(value) if fields[key].type in ("int", int) else value
    return dataclasses.replace(profile, **changes)


def submitit_parameters(profile: Profile, processes: int | None = None) -> dict[str, Any]:
    """AutoExecutor.update_parameters() arguments: one submitit task per process."""
    per_node = processes or profile.processes_per_node
    params: dict[str, Any] = {
        "nodes": profile.nodes,
        "tasks_per_node": per_node,
        "cpus_per_task": profile.cpus_per_process,
        "mem_gb": profile.mem_gb_per_node,
        "timeout_min": profile.time_min,
    }
    if profile.gpus_per_node:
        params["gpus_per_node"] = profile.gpus_per_node
    extra = {key: getattr(profile, key) for key in ("account", "qos", "constraint") if getattr(profile, key)}
    if profile.partition:
        params["slurm_partition"] = profile.partition
    if extra:
        params["slurm_additional_parameters"] = extra
    params["slurm_signal_delay_s"] = profile.signal_seconds
    return params


def sbatch_args(profile: Profile) -> list[str]:
    """sbatch options for one run started as one `accelerate launch` per node."""
    args = [
        f"--nodes={profile.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={profile.cpus_per_process * profile.processes_per_node}",
        f"--mem={profile.mem_gb_per_node}G",
        f"--time={profile.time_min}",
        f"--signal=B:USR1@{profile.signal_seconds}",
    ]
    if profile.gpus_per_node:
        args.append(f"--gpus-per-node={profile.gpus_per_node}")
    args += [f"--{key}={getattr(profile, key)}" for key in ("partition", "account", "qos", "constraint")
             if getattr(profile, key)]
    return args


def evaluate_sbatch_args(profile: Profile) -> list[str]:
    """sbatch options for the evaluator: one process on one GPU (or CPU) of the same partition."""
    args = ["--nodes=1", "--ntasks=1", f"--cpus-per-task={profile.cpus_per_process}",
            f"--mem={max(2, profile.mem_gb_per_node // max(1, profile.processes_per_node))}G",
            f"--time={min(profile.time_min, 4 * 60)}"]
    if profile.gpus_per_node:
        args.append("--gpus-per-node=1")
    args += [f"--{key}={getattr(profile, key)}" for key in ("partition", "account", "qos", "constraint")
             if getattr(profile, key)]
    return args


def shell_exports(profile: Profile) -> str:
    """``KEY=value`` lines the sbatch scripts eval to learn a profile's shape."""
    values = {
        "CXR_PROFILE_PROCS_PER_NODE": profile.processes_per_node,
        "CXR_PROFILE_WORKERS": profile.workers_per_process,
        "CXR_PROFILE_THREADS": profile.threads_per_process,
        "CXR_PROFILE_ACCELERATE_CONFIG": profile.accelerate_config,
        "CXR_PROFILE_SBATCH_ARGS": " ".join(sbatch_args(profile)),
        "CXR_PROFILE_EVAL_SBATCH_ARGS": " ".join(evaluate_sbatch_args(profile)),
    }
    return "\n".join(f"{key}={shlex.quote(str(value))}" for key, value in values.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.profiles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="profile to show; omit to list all")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sbatch", action="store_true", help="print its sbatch options on one line")
    group.add_argument("--shell", action="store_true", help="print KEY=value lines for the sbatch scripts")
    args = parser.parse_args(argv)
    if args.name is None:
        for profile in PROFILES.values():
            print(f"{profile.name:18s} {profile.description}")
        return 0
    profile = get_profile(args.name)
    if args.sbatch:
        print(" ".join(shlex.quote(a) for a in sbatch_args(profile)))
    elif args.shell:
        print(shell_exports(profile))
    else:
        for field in dataclasses.fields(profile):
            print(f"{field.name:20s} {getattr(profile, field.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
