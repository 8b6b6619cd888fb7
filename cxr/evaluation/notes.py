"""The warnings `python -m cxr.evaluate` prints and puts in report.md about its inputs: a threshold
split too small or lacking a class, and members whose training did not finish."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cxr.evaluation.scores import ScoreSet


def data_notes(tuning: ScoreSet | None, split: str | None) -> list[str]:
    """A warning when the threshold split is too small, or lacks a class of some labels (battery 10.1)."""
    from shards.manifest import split_warnings

    if tuning is None or split is None:
        return []
    y = np.asarray(tuning.y_true, dtype=np.float64)
    positives = {name: int(n) for name, n in zip(tuning.labels, (y == 1).sum(axis=0))}
    known = {name: int(n) for name, n in zip(tuning.labels, (~np.isnan(y)).sum(axis=0))}
    warnings = split_warnings(
        {split: tuning.n}, {split: positives}, f"--thresholds-from {split}", val=split, known_by_split={split: known}
    )
    return [
        w.replace("best-checkpoint selection and tuned thresholds rest", "the tuned thresholds rest") for w in warnings
    ]


def member_notes(infos: Sequence[dict[str, Any]]) -> list[str]:
    """One line per member whose training did not finish (members.json ``run_status``)."""
    out = []
    for info in infos:
        status = info.get("run_status") or {}
        if status.get("state") not in (None, "finished"):
            out.append(
                f"member {info['name']} ({info['run_dir']}) is unfinished: its status.json says "
                f"{status['state']!r} at epoch {status.get('epoch')} step {status.get('global_step')}; "
                f"it is evaluated from its best checkpoint so far (epoch {info.get('best_epoch')}) — "
                "finish its training (re-run the same command) for the final model"
            )
    return out
