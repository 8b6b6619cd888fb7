"""Cluster profiles: the one table of job sizes used by every launcher (data: launch/profiles.yaml).

A profile says how big one training run is (nodes, GPUs, CPUs, memory, wall
time) and where it may run (partition, account, qos, constraint). The submitit
launcher (`launch.submit`) starts one task per GPU (or per CPU process); the
sbatch scripts (`slurm/*.sh`, `slurm/*.sbatch`) start one `accelerate launch` per
node, so the same profile maps to two shapes — see :func:`submitit_parameters`
and :func:`sbatch_args`. Print a profile's sbatch options with
``python -m launch.profiles NAME --sbatch``.

The table is data: add or override profiles in a site file of the same layout named by
``CXR_PROFILES=FILE[:FILE...]`` or ``--profiles FILE`` (launch/profiles.yaml says how).
Site-specific fields (partition, account, qos) default to empty and can also be
overridden without any file: ``CXR_PARTITION``, ``CXR_ACCOUNT``,
``CXR_QOS``, ``CXR_CONSTRAINT`` in the environment, or ``--profile-set key=value``
on ``python -m launch.submit``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrbase.errors import CxrError, cli_entry


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
    """Memory per node in GB; 0 = all of the node's memory (Slurm --mem=0)."""
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
    eval_mem_gb: int = 0
    """Memory of the one-process evaluator job (0: mem_gb_per_node / processes_per_node)."""
    env: dict = field(default_factory=dict)
    """Environment exported into the job (NCCL/EFA/gloo networking); the submitter's own values win."""

    def __post_init__(self) -> None:
        if self.mem_gb_per_node == 0 and self.eval_mem_gb == 0:
            raise CxrError(
                f"profile {self.name!r}: mem_gb_per_node 0 (the whole node) needs eval_mem_gb "
                "for the evaluator — set it in the profile table"
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    def with_site(self, env: dict[str, str] | None = None) -> Profile:
        """This profile with partition/account/qos/constraint from CXR_* environment variables."""
        env = os.environ if env is None else env
        site = {
            key: env[f"CXR_{key.upper()}"]
            for key in ("partition", "account", "qos", "constraint")
            if env.get(f"CXR_{key.upper()}")
        }
        return dataclasses.replace(self, **site)


TABLE = Path(__file__).with_name("profiles.yaml")
SITE_ENV = "CXR_PROFILES"  # ":"-separated site files read after TABLE


def load_profiles(files: Sequence[str | Path] = ()) -> dict[str, Profile]:
    """Profiles of launch/profiles.yaml, then of each site file in order (later entries win).

    A site entry with a known name changes only the fields it gives (``env`` merged key by
    key); a new name starts from ``base: NAME`` when given, else must give every field."""
    raw: dict[str, dict] = {}
    for path in [TABLE, *files]:
        for name, entry in _read_table(Path(path)).items():
            entry = dict(entry)
            base = entry.pop("base", None)
            if base is not None and base not in raw:
                raise CxrError(
                    f"{path}: profile {name!r}: base {base!r} is not defined before it — use one of {', '.join(raw)}"
                )
            start = dict(raw[base] if base is not None else raw.get(name, {}))
            env = {**start.get("env", {}), **entry.pop("env", {})}
            raw[name] = {**start, **entry, "env": env, "_file": str(path)}
    return {name: _profile(name, entry) for name, entry in raw.items()}


def _read_table(path: Path) -> dict:
    import yaml

    try:
        table = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CxrError(
            f"{path}: cannot read the profile table ({str(err).splitlines()[0]}) — fix the file or {SITE_ENV}"
        ) from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise CxrError(f"{path}: expected a mapping of profile name → fields — see launch/profiles.yaml")
    return table


def _profile(name: str, entry: dict) -> Profile:
    path = entry.pop("_file")
    fields = {f.name: f for f in dataclasses.fields(Profile) if f.name != "name"}
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        raise CxrError(f"{path}: profile {name!r}: unknown field(s) {unknown} — valid: {', '.join(fields)}")
    missing = [
        k
        for k, f in fields.items()
        if k not in entry and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise CxrError(f"{path}: profile {name!r} lacks {missing} — give them or start from `base: NAME`")
    try:
        values = {
            k: (
                int(v)
                if fields[k].type in ("int", int)
                else {str(a): str(b) for a, b in v.items()}
                if k == "env"
                else str(v)
            )
            for k, v in entry.items()
        }
    except (TypeError, ValueError, AttributeError) as err:
        raise CxrError(f"{path}: profile {name!r}: {err} — integers for sizes, a mapping for env") from None
    return Profile(name=name, **values)


PROFILES: dict[str, Profile] = load_profiles([p for p in os.environ.get(SITE_ENV, "").split(":") if p])


def use_profile_files(files: Sequence[str | Path]) -> None:
    """Reload PROFILES with these site files added (``--profiles FILE``)."""
    extra = [p for p in os.environ.get(SITE_ENV, "").split(":") if p] + list(files)
    table = load_profiles(extra)
    PROFILES.clear()
    PROFILES.update(table)


DEFAULT_PROFILE = "cpu-local"


def get_profile(name: str) -> Profile:
    """The profile called ``name``, with site overrides from the environment applied."""
    if name not in PROFILES:
        raise CxrError(
            f"profile {name!r}: unknown — choose one of {', '.join(PROFILES)} "
            f"(launch/profiles.yaml, or add it in a site file: {SITE_ENV} / --profiles)"
        )
    return PROFILES[name].with_site()


def override_profile(profile: Profile, assignments: Sequence[str]) -> Profile:
    """Apply ``key=value`` overrides (e.g. ``nodes=2``, ``partition=gpu``) to a profile."""
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if sep and key.startswith("env.") and len(key) > 4:
            changes["env"] = {**changes.get("env", profile.env), key[4:]: value}
            continue
        if not sep or key not in fields or key in ("name", "env"):
            raise CxrError(
                f"--profile-set {item!r}: expected key=value with key one of "
                f"{', '.join(k for k in fields if k not in ('name', 'env'))}, or env.VARIABLE"
            )
        changes[key] = int(value) if fields[key].type in ("int", int) else value
    return dataclasses.replace(profile, **changes)


def submitit_parameters(profile: Profile, processes: int | None = None) -> dict[str, Any]:
    """AutoExecutor.update_parameters() arguments: one submitit task per process."""
    per_node = processes or profile.processes_per_node
    params: dict[str, Any] = {
        "nodes": profile.nodes,
        "tasks_per_node": per_node,
        "cpus_per_task": profile.cpus_per_process,
        "timeout_min": profile.time_min,
    }
    if profile.mem_gb_per_node:
        params["mem_gb"] = profile.mem_gb_per_node
    else:
        params["slurm_mem"] = "0"  # the whole node
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
        f"--mem={profile.mem_gb_per_node}G" if profile.mem_gb_per_node else "--mem=0",
        f"--time={profile.time_min}",
        f"--signal=B:USR1@{profile.signal_seconds}",
    ]
    if profile.gpus_per_node:
        args.append(f"--gpus-per-node={profile.gpus_per_node}")
    args += [
        f"--{key}={getattr(profile, key)}"
        for key in ("partition", "account", "qos", "constraint")
        if getattr(profile, key)
    ]
    return args


def evaluate_sbatch_args(profile: Profile) -> list[str]:
    """sbatch options for the evaluator: one process on one GPU (or CPU) of the same partition."""
    args = [
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={profile.cpus_per_process}",
        f"--mem={eval_mem_gb(profile)}G",
        f"--time={min(profile.time_min, 4 * 60)}",
    ]
    if profile.gpus_per_node:
        args.append("--gpus-per-node=1")
    args += [
        f"--{key}={getattr(profile, key)}"
        for key in ("partition", "account", "qos", "constraint")
        if getattr(profile, key)
    ]
    return args


def eval_mem_gb(profile: Profile) -> int:
    """GB for the one-process evaluator: eval_mem_gb, else this process's share of the node (≥ 2)."""
    return profile.eval_mem_gb or max(2, profile.mem_gb_per_node // max(1, profile.processes_per_node))


def env_exports(profile: Profile) -> list[str]:
    """``export KEY="${KEY:-value}"`` lines: the profile's env, a value already set winning."""
    return [f'export {key}="${{{key}:-{value}}}"' for key, value in sorted(profile.env.items())]


def shell_exports(profile: Profile) -> str:
    """``KEY=value`` lines the sbatch scripts eval to learn a profile's shape."""
    values = {
        "CXR_PROFILE_PROCS_PER_NODE": profile.processes_per_node,
        "CXR_PROFILE_WORKERS": profile.workers_per_process,
        "CXR_PROFILE_THREADS": profile.threads_per_process,
        "CXR_PROFILE_ACCELERATE_CONFIG": profile.accelerate_config,
        "CXR_PROFILE_SBATCH_ARGS": " ".join(sbatch_args(profile)),
        "CXR_PROFILE_EVAL_SBATCH_ARGS": " ".join(evaluate_sbatch_args(profile)),
        "CXR_PROFILE_ENV": "; ".join(env_exports(profile)),
    }
    return "\n".join(f"{key}={shlex.quote(str(value))}" for key, value in values.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.profiles", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", nargs="?", help="profile to show; omit to list all")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sbatch", action="store_true", help="print its sbatch options on one line")
    group.add_argument("--shell", action="store_true", help="print KEY=value lines for the sbatch scripts")
    group.add_argument("--env", action="store_true", help="print the profile's export lines (eval them before sbatch)")
    parser.add_argument(
        "--profiles",
        action="append",
        default=[],
        metavar="FILE",
        help=f"site profile file read after launch/profiles.yaml (also {SITE_ENV}; repeatable)",
    )
    args = parser.parse_args(argv)
    if args.profiles:
        use_profile_files(args.profiles)
    if args.name is None:
        for profile in PROFILES.values():
            print(f"{profile.name:18s} {profile.description}")
        return 0
    profile = get_profile(args.name)
    if args.sbatch:
        print(" ".join(shlex.quote(a) for a in sbatch_args(profile)))
    elif args.shell:
        print(shell_exports(profile))
    elif args.env:
        print("\n".join(env_exports(profile)))
    else:
        for field in dataclasses.fields(profile):
            print(f"{field.name:20s} {getattr(profile, field.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
