"""What launch.submit submits, planned from its arguments: the training runs (name → train
argv, run dir), the evaluations after them, and for an ablation the sweep's grid × resolutions ×
seeds with each run's memory-probe spec and the ablation report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrbase.errors import CxrError
from launch.members import RESUME, RUN_DIR_KEY, SHARDS_KEY, load_ensemble, member_argv
from launch.profiles import (
    Profile,
)


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
