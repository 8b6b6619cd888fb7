"""Ensemble configs: which members to train, each with its seed and hyper-parameters.

An ensemble config (``launch/ensembles/*.yaml``) is::

    name: densenet121-dwbce          # names the runs folder and the report
    config: cxr/configs/X.yaml       # training config every member starts from
    overrides: {loss.name: ...}      # key=value for every member
    members:                         # one training run each
      - name: seed0                  # the member's run dir is RUNS/<name>
        overrides: {train.seed: 0}
    evaluate: [--bootstrap, "200"]   # extra options of python -m cxr.evaluate (optional)

Overrides are the training CLI's ``key=value`` pairs; a member's override wins
over the common one. Both launchers read members through :func:`load_ensemble`
and :func:`member_argv`; the sbatch script asks for one member's argument list
by array index with ``python -m launch.members CONFIG --argv I --runs DIR``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxrbase.errors import CxrError, cli_entry

ENSEMBLES_DIR = Path(__file__).resolve().parent / "ensembles"
# Keys of the training config (cxr/train.py) the launchers set for every member.
RUN_DIR_KEY = "checkpoint.run_dir"
SHARDS_KEY = "data.shards"
RESUME = "checkpoint.resume=auto"


@dataclass(frozen=True)
class Member:
    """One ensemble member: its name (run dir under RUNS) and its training overrides."""

    name: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Ensemble:
    """A parsed ensemble config."""

    name: str
    path: Path
    config: str
    overrides: dict[str, Any]
    members: list[Member]
    evaluate: list[str] = field(default_factory=list)


def resolve_ensemble_path(name_or_path: str | Path) -> Path:
    """A path as given, or the name of a file in launch/ensembles/ (``tiny`` → tiny.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = ENSEMBLES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in ENSEMBLES_DIR.glob("*.yaml")))
    raise CxrError(f"{name_or_path}: no such ensemble config — give a YAML path or one of: {known}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CxrError(f"{where}: overrides must be a mapping key: value")
    return dict(value)


def load_ensemble(name_or_path: str | Path) -> Ensemble:
    """Read and check an ensemble config (see the module docstring for the format)."""
    path = resolve_ensemble_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CxrError(f"{path}: unreadable YAML ({err}) — fix the file") from err
    if not isinstance(raw, dict) or "config" not in raw or not raw.get("members"):
        raise CxrError(f"{path}: needs `config:` (training config) and a non-empty `members:` list")
    members = []
    for i, item in enumerate(raw["members"]):
        if not isinstance(item, dict) or not item.get("name"):
            raise CxrError(f"{path}: members[{i}] needs a `name:`")
        members.append(Member(str(item["name"]), _mapping(item.get("overrides"), f"{path}: members[{i}]")))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise CxrError(f"{path}: member names repeat ({names}) — each names its own run dir")
    return Ensemble(
        name=str(raw.get("name", path.stem)),
        path=path,
        config=str(raw["config"]),
        overrides=_mapping(raw.get("overrides"), str(path)),
        members=members,
        evaluate=[str(a) for a in raw.get("evaluate") or []],
    )


def format_value(value: Any) -> str:
    """A YAML scalar as the training CLI expects it (true/false, numbers as written)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def member_argv(
    ensemble: Ensemble, index: int, runs: str | Path, shards: str | Path | None = None, extra: Sequence[str] = ()
) -> list[str]:
    """The training argv of member ``index``: ``--config X key=value ...``.

    Order of precedence (last wins): common overrides, the member's, shards and run
    dir, resume=auto, then ``extra`` (e.g. ``train.max_steps=3`` from the command line).
    """
    if not 0 <= index < len(ensemble.members):
        raise CxrError(f"{ensemble.path}: member index {index} out of range 0..{len(ensemble.members) - 1}")
    member = ensemble.members[index]
    merged = {**ensemble.overrides, **member.overrides}
    argv = ["--config", ensemble.config]
    argv += [f"{key}={format_value(value)}" for key, value in merged.items()]
    if shards is not None:
        argv.append(f"{SHARDS_KEY}={shards}")
    argv += [f"{RUN_DIR_KEY}={Path(runs) / member.name}", RESUME, *extra]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.members", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ensemble", help="ensemble config: a YAML path or a name in launch/ensembles/")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--count", action="store_true", help="print the number of members")
    what.add_argument("--names", action="store_true", help="print member names, one per line")
    what.add_argument("--run-dirs", action="store_true", help="print RUNS/<name> per member, one per line")
    what.add_argument("--argv", type=int, metavar="I", help="print member I's training arguments, one per line")
    what.add_argument("--evaluate-args", action="store_true", help="print the evaluator's extra options, one per line")
    parser.add_argument("--runs", default="runs", help="folder of the members' run dirs (default: runs)")
    parser.add_argument("--shards", help="shards directory passed to training as data.shards")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra training override for every member (repeatable)",
    )
    args = parser.parse_args(argv)
    ensemble = load_ensemble(args.ensemble)
    if args.count:
        lines = [str(len(ensemble.members))]
    elif args.names:
        lines = [m.name for m in ensemble.members]
    elif args.run_dirs:
        lines = [str(Path(args.runs) / m.name) for m in ensemble.members]
    elif args.evaluate_args:
        lines = ensemble.evaluate
    else:
        lines = member_argv(ensemble, args.argv, args.runs, args.shards, args.extra)
    if lines:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
