"""The evaluation's markdown: number formatting, the wide AUROC/AUPRC tables and
report.md's sections (threshold metrics, operating points, calibration, subgroups, label mapping)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cxr.evaluation.analysis import FEW_POSITIVES, Analysis
from cxr.evaluation.scores import ENSEMBLE, MEAN, ScoreSet
from cxr.evaluation.thresholds import METRIC_COLUMNS
from cxrbase.labels import LABELS


def fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def auroc_wide(aucs: pd.DataFrame, with_ci: bool = True) -> pd.DataFrame:
    """Label × member table of AUROC strings ("0.812 [0.80, 0.83]") plus prevalence (%)."""
    members = list(dict.fromkeys(aucs["member"]))
    table = pd.DataFrame(index=_label_rows(aucs))
    first = aucs[aucs["member"] == members[0]].set_index("label")
    table["prevalence %"] = [fmt(100 * first.loc[label, "prevalence"], 2) for label in table.index]
    for member in members:
        rows = aucs[aucs["member"] == member].set_index("label")
        table[member] = [
            fmt(r.auroc) + (f" [{fmt(r.ci_low, 2)}, {fmt(r.ci_high, 2)}]" if with_ci and np.isfinite(r.ci_low) else "")
            for r in (rows.loc[label] for label in table.index)
        ]
    table.index.name = "label"
    return table


def _label_rows(aucs: pd.DataFrame) -> list[str]:
    """The table's labels in their order, then the mean row."""
    return [*dict.fromkeys(label for label in aucs["label"] if label != MEAN), MEAN]


def format_stdout_table(aucs: pd.DataFrame) -> str:
    """The per-label AUROC table (members and ensemble, with CIs) as fixed-width text."""
    return auroc_wide(aucs).to_string()


def markdown_table(frame: pd.DataFrame, index: bool = True) -> str:
    frame = frame.reset_index() if index else frame
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _published_columns(table: pd.DataFrame) -> pd.DataFrame:
    from cxr.evaluation.published import PUBLISHED, published_mean

    if [label for label in table.index if label != MEAN] != list(LABELS):
        return table  # published numbers exist only for the 14 NIH labels
    for column in PUBLISHED:
        name = column.name + ("" if column.comparable else " †")
        table[name] = [
            fmt(column.auroc[label]) if label in column.auroc else fmt(published_mean(column)) for label in table.index
        ]
    return table


def _auprc_wide(aucs: pd.DataFrame) -> pd.DataFrame:
    members = list(dict.fromkeys(aucs["member"]))
    table = pd.DataFrame(index=_label_rows(aucs))
    for member in members:
        rows = aucs[aucs["member"] == member].set_index("label")
        table[member] = [fmt(rows.loc[label, "auprc"]) for label in table.index]
    table.index.name = "label"
    return table


def _threshold_summary(metrics: pd.DataFrame, member: str) -> pd.DataFrame:
    rows = metrics[(metrics["member"] == member) & metrics["label"].isin(["macro", "micro"])]
    out = pd.DataFrame(
        {
            "thresholds": rows["thresholds"],
            "average": rows["label"],
            **{name: rows[name].map(fmt) for name in METRIC_COLUMNS},
            "Hamming loss": rows["hamming_loss"].map(fmt),
            "exact match": rows["exact_match"].map(fmt),
        }
    )
    return out


def _members_table(members: Sequence[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for m in members:
        options = ", ".join(
            f"{k}={v}" for k, v in (m.get("model_options") or {}).items() if v not in (None, False, "none", 0, 0.0)
        )
        best_val = m.get("best_val")
        if isinstance(best_val, dict):
            best_val = ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}" for k, v in best_val.items())
        rows.append(
            {
                "member": m.get("name"),
                "model": m.get("model"),
                "options": options or "—",
                "loss": m.get("loss") or "—",
                "lr": m.get("lr") if m.get("lr") is not None else "—",
                "seed": m.get("seed") if m.get("seed") is not None else "—",
                "train px": m.get("train_resolution") or "—",
                "eval px": m.get("eval_resolution") or "—",
                "best epoch": m.get("best_epoch") if m.get("best_epoch") is not None else "—",
                "best val": best_val or "—",
                "run dir": f"`{m.get('run_dir')}`",
            }
        )
    return pd.DataFrame(rows)


def _validity_note(aucs: pd.DataFrame, focus: str) -> str:
    """How many resamples each CI rests on, and which labels have too few positives (report.md)."""
    rows = aucs[aucs["member"] == focus].set_index("label")
    n_boot = int(rows["n_boot"].iloc[0])
    text = (
        f"the mean-AUROC CI is a per-label-mean bootstrap (each resample's mean over the labels "
        f"with both classes in it): `{focus}` mean from {int(rows.loc[MEAN, 'n_valid'])} of {n_boot} "
        f"valid resamples"
    )
    partial = [
        f"{label} {int(rows.loc[label, 'n_valid'])}/{n_boot}"
        for label in rows.index
        if label != MEAN and 0 < rows.loc[label, "n_valid"] < n_boot
    ]
    if partial:
        text += "; labels defined in fewer resamples: " + ", ".join(partial)
    return text


def _unit_text(analysis: Analysis) -> str:
    """What the bootstrap resampled, for report.md."""
    if analysis.resampling == "patient":
        return (
            f"patients ({analysis.n_units} patients: each resample draws whole patients, all their "
            f"images with them; --resample image draws images)"
        )
    return "images (each image drawn independently)"


def _few_positives_note(aucs: pd.DataFrame) -> list[str]:
    """A report.md bullet naming the labels with fewer than FEW_POSITIVES positives (or nothing)."""
    rows = aucs[aucs["member"] == aucs["member"].iloc[0]].set_index("label")
    few = [
        f"{label} ({int(rows.loc[label, 'n_pos'])})"
        for label in rows.index
        if label != MEAN and rows.loc[label, "few_positives"]
    ]
    if not few:
        return []
    return [
        f"- **labels with fewer than {FEW_POSITIVES} positives** (their AUROC and CI rest on very few "
        f"images; `few_positives` in aucs.csv): " + ", ".join(few)
    ]


def _ci(value: float, low: float, high: float, digits: int = 3) -> str:
    return fmt(value, digits) + (f" [{fmt(low, digits)}, {fmt(high, digits)}]" if np.isfinite(low) else "")


def _map_text(entry: dict[str, Any]) -> str:
    method = entry.get("method")
    if method == "temperature":
        return f"temperature T={entry['temperature']:.3g}"
    if method == "platt":
        return f"Platt a={entry['a']:.3g}, b={entry['b']:.3g}"
    return "none"


def _calibration_section(analysis: Analysis, focus: str, split: str, level: int) -> list[str]:
    table = analysis.calibration
    if table is None:
        return []
    rows = table[table["member"] == focus]
    raw = rows[rows["variant"] == "raw"].set_index("label")
    cal = rows[rows["variant"] == "calibrated"].set_index("label")
    maps = (analysis.calibration_doc or {}).get("labels", {})
    out = []
    for label in raw.index:
        r = raw.loc[label]
        line = {
            "label": label,
            "ECE raw": _ci(r.ece_width, r.ece_width_low, r.ece_width_high),
            "ECE (equal mass) raw": fmt(r.ece_mass),
            "Brier raw": _ci(r.brier, r.brier_low, r.brier_high),
            "REL / RES / UNC": f"{fmt(r.reliability, 4)} / {fmt(r.resolution, 4)} / {fmt(r.uncertainty, 4)}",
        }
        if label in cal.index:
            c = cal.loc[label]
            line.update(
                {
                    "ECE calibrated": _ci(c.ece_width, c.ece_width_low, c.ece_width_high),
                    "ECE (equal mass) calibrated": fmt(c.ece_mass),
                    "Brier calibrated": _ci(c.brier, c.brier_low, c.brier_high),
                    "map (fitted on " + str((analysis.calibration_doc or {}).get("fitted_on")) + ")": _map_text(
                        maps[label]
                    )
                    if label in maps
                    else "mean of the labels",
                }
            )
        out.append(line)
    ci_text = (
        f"{level} % CIs from the same {analysis.resampling}-level bootstrap as the AUROCs (equal-mass bin "
        "edges fixed at the full split's)"
        if analysis.resampling != "none"
        else "no CIs (--bootstrap 0)"
    )
    text = [
        f"## Calibration of `{focus}` on `{split}`",
        "",
        "ECE (expected calibration error) is the image-weighted mean gap between the predicted probability and the "
        "observed frequency of the finding over 15 bins (0 = a probability of 0.3 comes true 30 % of the time); "
        "Brier is the mean squared error of the probability, = reliability − resolution + uncertainty "
        "(REL / RES / UNC, equal-width bins: lower REL and higher RES are better, UNC is the label's own "
        f"variance). ECE columns use equal-width bins unless named equal mass; {ci_text}. ECE is biased upward "
        "on small samples (bin noise), and more so within a resample that repeats images, so on a small split "
        "its interval can sit above the estimate; read it as the spread, not a bias-corrected range.",
        "",
    ]
    if not cal.empty:
        text += [
            "Post-hoc calibration (monotone, so AUROC and the ranking are unchanged): temperature "
            "σ(logit p / T) and Platt σ(a logit p + b) per label, fitted on the threshold split, the map per "
            "label chosen by 5-fold cross-validated log-loss there (none when neither helps) and applied here. "
            "The fitted parameters are in `calibration.json` (for `cxr.tools.export`); every member and variant in "
            "`calibration.csv`; the diagrams in `reliability.png`.",
            "",
        ]
    return text + [markdown_table(pd.DataFrame(out), index=False), "", "![Reliability diagrams](reliability.png)", ""]


def _operating_section(analysis: Analysis, focus: str, split: str, level: int) -> list[str]:
    if not analysis.tuned:
        return []
    names = {
        "f1": "F1-optimal",
        "youden": "Youden-optimal",
        "sens90": "sensitivity ≥ 0.90",
        "sens95": "sensitivity ≥ 0.95",
        "spec90": "specificity ≥ 0.90",
    }
    m = analysis.metrics
    rows = m[(m["member"] == focus) & m["thresholds"].isin(["f1", "sens90", "spec90"])]
    out = []
    for label in [*scores_labels(m, focus), "micro"]:
        for set_name in ("f1", "sens90", "spec90"):
            r = rows[(rows["label"] == label) & (rows["thresholds"] == set_name)]
            if r.empty:
                continue
            r = r.iloc[0]
            out.append(
                {
                    "label": label,
                    "threshold (chosen on val)": f"{names[set_name]}"
                    + (f" = {r.threshold:.3f}" if label != "micro" else ""),
                    **{
                        k: _ci(r[k], r[f"{k}_low"], r[f"{k}_high"], 2)
                        for k in ("sensitivity", "specificity", "ppv", "npv", "f1")
                    },
                }
            )
    return [
        f"## Operating points of `{focus}` on `{split}` ({level} % CIs)",
        "",
        "Each threshold is chosen on the threshold split — the F1 optimum, the highest threshold still reaching "
        "90 % sensitivity there, the lowest reaching 90 % specificity — and applied unchanged here, so the "
        "sensitivity a target promised can come out lower on this split. Sensitivity, specificity, PPV and NPV "
        "carry Wilson score intervals (images as independent trials: narrower than a patient-level interval); "
        f"F1 a percentile-bootstrap interval ({analysis.resampling} level). Youden, sensitivity ≥ 0.95 and 0.5 "
        "are in `metrics.csv` with the same columns, for every member.",
        "",
        markdown_table(pd.DataFrame(out), index=False),
        "",
    ]


def scores_labels(metrics: pd.DataFrame, member: str) -> list[str]:
    """The per-label rows of metrics.csv in order (not macro/micro)."""
    labels = metrics.loc[metrics["member"] == member, "label"]
    return [x for x in dict.fromkeys(labels) if x not in ("macro", "micro")]


def _subgroup_section(analysis: Analysis, focus: str, split: str, level: int) -> list[str]:
    table = analysis.subgroups
    if table is None or table.empty:
        return []
    text = [
        f"## Subgroups of `{focus}` on `{split}` ({level} % CIs)",
        "",
        "AUROC per group with its bootstrap CI; each group is compared with the largest group of its grouping "
        "(the reference): the gap (group − reference) with a bootstrap CI over the same resamples and an unpaired "
        "DeLong test, Holm-adjusted over the labels (`p_holm`; * below 0.05). † marks fewer than "
        f"{FEW_POSITIVES} positives in the group (CI rests on very few images). Under-diagnosis "
        "(Seyyed-Kalantari et al. 2021) is the share of sick images (any finding) that the F1-tuned thresholds "
        "(0.5 without a threshold split) call No Finding (no label above its threshold), with a Wilson CI and a bootstrap CI of its gap. "
        "All numbers, with n, positives and patients per group, are in `subgroups.csv`.",
        "",
    ]
    for grouping, part in table.groupby("grouping", sort=False):
        auc = part[part["metric"] == "auroc"]
        groups = list(dict.fromkeys(auc["group"]))
        reference = auc["reference"].iloc[0]
        rows = []
        for label in dict.fromkeys(auc["label"]):
            line = {"label": label}
            for g in groups:
                r = auc[(auc["label"] == label) & (auc["group"] == g)].iloc[0]
                line[f"{g} (n={r.n})"] = _ci(r.value, r.ci_low, r.ci_high, 2) + (" †" if r.few_positives else "")
            for g in groups[1:]:
                r = auc[(auc["label"] == label) & (auc["group"] == g)].iloc[0]
                star = " *" if np.isfinite(r.p_holm) and r.p_holm < 0.05 else ""
                line[f"{g} − {reference}"] = _ci(r.gap, r.gap_low, r.gap_high, 3) + f", p_holm {fmt(r.p_holm, 3)}{star}"
            rows.append(line)
        text += [f"### {grouping} — AUROC", "", markdown_table(pd.DataFrame(rows), index=False), ""]
    under = table[table["metric"] == "underdiagnosis"]
    rows = [
        {
            "grouping": r.grouping,
            "group": r.group,
            "sick images": r.n_pos,
            "under-diagnosis rate": _ci(r.value, r.ci_low, r.ci_high, 3),
            "gap vs reference": "reference" if r.group == r.reference else _ci(r.gap, r.gap_low, r.gap_high, 3),
        }
        for r in under.itertuples()
    ]
    return text + [
        "### Under-diagnosis (sick called No Finding)",
        "",
        markdown_table(pd.DataFrame(rows), index=False),
        "",
    ]


def label_mapping_section(mapping: dict[str, Any] | None) -> list[str]:
    """report.md lines: which harmonisation rows (shards/datasets/labelmap.csv) made the shards'
    labels from each data set's findings — nothing for shards packed from an NIH or generic table."""
    if not mapping:
        return []
    rows = [
        {
            "dataset": r["dataset"],
            "source finding": r["source"],
            "label": r["target"] or "—",
            "relation": r["relation"],
        }
        for r in mapping.get("rows", [])
    ]
    return [
        f"## Label mapping ({', '.join(mapping.get('datasets', []))} → NIH 14)",
        "",
        f"From `{mapping.get('table')}` (sha256 {str(mapping.get('sha256', ''))[:12]}…). A label no row feeds is "
        "unknown for that data set (not negative); a `merged` finding is never split into its labels.",
        "",
        markdown_table(pd.DataFrame(rows), index=False),
        "",
    ]


def report_markdown(
    analysis: Analysis, scores: ScoreSet, *, split: str, context: dict[str, Any], members: Sequence[dict[str, Any]]
) -> str:
    """report.md: per-label AUROC of members vs ensemble with published columns, AUPRC,
    threshold metrics, run configs and figures. ``context``: split-level facts
    (ensemble method, bootstrap, seed, alpha, thresholds split, shards, source)."""
    from cxr.evaluation.published import CHEXNET_2017, WANG_2017

    level = round(100 * (1 - context.get("alpha", 0.05)))
    focus = ENSEMBLE if ENSEMBLE in scores.scores else list(scores.scores)[-1]
    boot = context.get("bootstrap", 0)
    lines = [
        f"# Evaluation report — split `{split}`",
        "",
        f"- images: {scores.n}; members: {len([m for m in scores.scores if m != ENSEMBLE])}; "
        f"ensemble: {context.get('ensemble', 'mean-prob')} of the members' outputs",
        f"- AUROC CI: {level} % percentile bootstrap over {_unit_text(analysis)}, {boot} resamples shared by all "
        f"members and the ensemble (seed {context.get('seed', 0)}); {_validity_note(analysis.aucs, focus)}"
        if boot
        else "- AUROC CI: none (--bootstrap 0)",
        *_few_positives_note(analysis.aucs),
        f"- thresholds tuned on split `{context.get('thresholds_from')}` "
        f"({analysis.thresholds.get('n_images', 0)} images)"
        if analysis.tuned
        else "- thresholds: 0.5 only",
        f"- source: {context.get('source', '')}",
        f"- written: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"## Per-label AUROC ({level} % CI) — members vs ensemble",
        "",
        markdown_table(_published_columns(auroc_wide(analysis.aucs))),
        "",
        f"Prevalence is that of this split (`{split}`). Published columns: {WANG_2017.note}; "
        f"comparable only if this split is that official test list (25,596 images; this one has "
        f"{scores.n}). † {CHEXNET_2017.note}. Their mean rows are the unweighted means of the 14 labels.",
        "",
        "## AUPRC (chance level = prevalence)",
        "",
        markdown_table(_auprc_wide(analysis.aucs)),
        "",
        f"## Threshold metrics of `{focus}` on `{split}`",
        "",
        markdown_table(_threshold_summary(analysis.metrics, focus), index=False),
        "",
        "Per-label values for every member are in `metrics.csv`; thresholds in `thresholds.json`.",
        "",
        *context.get("sections", []),  # sections of other modules (cxr.evaluation.cross_site's external validation)
        *_operating_section(analysis, focus, split, level),
        *_calibration_section(analysis, focus, split, level),
        *_subgroup_section(analysis, focus, split, level),
        *label_mapping_section(context.get("label_mapping")),
        "## Members (run configs)",
        "",
        markdown_table(_members_table(members), index=False) if members else "(not recorded)",
        "",
        "## Figures",
        "",
        "![ROC curves](roc.png)",
        "",
        "![Precision-recall curves](pr.png)",
        "",
    ]
    notes = list(analysis.notes) + list(context.get("notes", []))
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)
