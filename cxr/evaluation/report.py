"""The evaluation's outputs, from scores already inferred: :func:`write_outputs` writes aucs.csv,
thresholds.json, metrics.csv, calibration.csv, calibration.json, subgroups.csv, roc.png, pr.png,
reliability.png and report.md atomically. Nothing here loads models.

The work is done by the modules named below; this one writes their results and re-exports the
names callers use (``from cxr.evaluation.report import analyse, write_outputs``):

- cxr.evaluation.scores — :class:`ScoreSet` (one split's keys, truth and probabilities);
- cxr.evaluation.analysis — :func:`analyse`: AUROC/AUPRC with bootstrap CIs, calibration, subgroups;
- cxr.evaluation.thresholds — tuned thresholds and the threshold metrics with intervals;
- cxr.evaluation.tables — the markdown (report.md, the stdout table);
- cxr.evaluation.figures — roc.png, pr.png, reliability.png.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr.evaluation.analysis import (  # noqa: F401  (re-exported: the evaluator's names)
    FEW_POSITIVES,
    Analysis,
    analyse,
    auc_table,
    calibration_table,
    make_resamples,
)
from cxr.evaluation.figures import plot_curves, plot_reliability
from cxr.evaluation.scores import ENSEMBLE, MEAN, ScoreSet, focus_member  # noqa: F401
from cxr.evaluation.tables import (  # noqa: F401
    auroc_wide,
    format_stdout_table,
    label_mapping_section,
    report_markdown,
)
from cxr.evaluation.thresholds import (  # noqa: F401
    METRIC_COLUMNS,
    TARGETS,
    THRESHOLD_SETS,
    metrics_table,
    read_thresholds,
    thresholds_document,
    tune_all,
)
from cxrbase.atomic import atomic_write_text


def write_outputs(
    out: Path,
    analysis: Analysis,
    scores: ScoreSet,
    *,
    split: str,
    context: dict[str, Any],
    members: Sequence[dict[str, Any]],
    figures: bool = True,
) -> dict[str, float]:
    """Write aucs.csv, thresholds.json, metrics.csv, calibration.csv, calibration.json,
    subgroups.csv, roc.png, pr.png, reliability.png, report.md (atomic; each when computed).

    Returns seconds spent per group (tables, figures).
    """
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    atomic_write_text(out / "aucs.csv", analysis.aucs.to_csv(index=False))
    atomic_write_text(out / "metrics.csv", analysis.metrics.to_csv(index=False))
    atomic_write_text(out / "thresholds.json", json.dumps(analysis.thresholds, indent=2) + "\n")
    if analysis.calibration is not None:
        atomic_write_text(out / "calibration.csv", analysis.calibration.to_csv(index=False))
    if analysis.calibration_doc is not None:
        from cxr.evaluation.calibration import write_calibration

        write_calibration(out, analysis.calibration_doc)
    if analysis.subgroups is not None:
        atomic_write_text(out / "subgroups.csv", analysis.subgroups.to_csv(index=False))
    seconds = {"tables": time.perf_counter() - t0}
    if figures:
        t1 = time.perf_counter()
        plot_curves(out / "roc.png", scores, analysis.aucs, analysis.tuned, "roc", split)
        plot_curves(out / "pr.png", scores, analysis.aucs, analysis.tuned, "pr", split)
        if analysis.calibration is not None:
            plot_reliability(out / "reliability.png", scores, analysis.calibrated, split, analysis)
        seconds["figures"] = time.perf_counter() - t1
    atomic_write_text(
        out / "report.md", report_markdown(analysis, scores, split=split, context=context, members=members)
    )
    return seconds
