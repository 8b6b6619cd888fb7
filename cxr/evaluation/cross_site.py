"""Cross-site (external) evaluation: runs trained on one data set scored on another's shards.

The two sides share labels by name (after the harmonisation that packing applies): the model's
labels (its run's training shards) and the evaluated shards' labels. The evaluation keeps the
labels both have and a defined AUROC on the evaluated split, and says for every other label why
it was dropped:

- ``absent in the shards``: the model predicts it, the shards do not have it;
- ``not predicted by the model``: the shards have it, the model was not trained on it;
- ``all-unknown``: the shards have the column but no image of the split knows it (masked);
- ``single class``: the split's known labels are all positive or all negative (AUROC undefined).

``--compare-to REPORT`` (an earlier report folder or its ``aucs.csv``, e.g. the same runs on
their own test split) puts the internal AUROCs beside the external ones, paired by label, with
the delta external − internal per label and over the paired labels' mean. This module owns the
report's ``cross_site.csv``; report.md gets its section through the evaluator's context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrbase.atomic import atomic_write
from cxrbase.errors import CxrError

CROSS_SITE_CSV = "cross_site.csv"
ABSENT, UNPREDICTED, ALL_UNKNOWN, SINGLE_CLASS = (
    "absent in the shards",
    "not predicted by the model",
    "all-unknown",
    "single class",
)


@dataclasses.dataclass(frozen=True)
class LabelPlan:
    """Which model outputs meet which shard label columns (by name)."""

    model: tuple[str, ...]
    shards: tuple[str, ...]
    shared: tuple[str, ...]  # in the model's order

    @property
    def cross_site(self) -> bool:
        """True when the two label lists differ (another data set, or another label order)."""
        return self.model != self.shards

    @property
    def model_index(self) -> list[int]:
        return [self.model.index(name) for name in self.shared]

    @property
    def shards_index(self) -> list[int]:
        return [self.shards.index(name) for name in self.shared]

    def dropped(self) -> dict[str, str]:
        """{label: reason} of the labels only one side has."""
        out = {name: ABSENT for name in self.model if name not in self.shards}
        out.update({name: UNPREDICTED for name in self.shards if name not in self.model})
        return out


def label_plan(model: Sequence[str], shards: Sequence[str], where: str) -> LabelPlan:
    """The plan for a model with labels ``model`` on shards with labels ``shards``; CxrError when
    they share no label (``where`` names the shards)."""
    shared = tuple(name for name in model if name in shards)
    if not shared:
        raise CxrError(
            f"{where}: the shards' labels {list(shards)[:5]} share no name with the model's {list(model)[:5]} — "
            "pack the shards with the label mapping onto the model's label names (cxr-shards pack), or "
            "evaluate runs trained on these labels"
        )
    return LabelPlan(tuple(model), tuple(shards), shared)


def drop_undefined(
    per_split: dict[str, Any], split: str, single_class: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """Leave out of every split's ScoreSet the labels that are all-unknown (or, with
    ``single_class``, single-class) on ``split`` (the evaluated one); returns (the score sets,
    {label: reason})."""
    scores = per_split[split]
    y = np.asarray(scores.y_true, dtype=np.float64)
    known, positives = (~np.isnan(y)).sum(axis=0), (y == 1).sum(axis=0)
    reasons = {}
    for c, name in enumerate(scores.labels):
        if known[c] == 0:
            reasons[name] = ALL_UNKNOWN
        elif single_class and positives[c] in (0, known[c]):
            reasons[name] = SINGLE_CLASS
    if len(reasons) == len(scores.labels):
        raise CxrError(
            f"split {split!r}: no shared label has both classes among its known labels "
            f"({', '.join(f'{k}: {v}' for k, v in reasons.items())}) — evaluate a larger split"
        )
    if not reasons:
        return per_split, reasons
    keep = [c for c, name in enumerate(scores.labels) if name not in reasons]
    return {k: subset_labels(v, keep) for k, v in per_split.items()}, reasons


def subset_labels(scores: Any, columns: Sequence[int]) -> Any:
    """A ScoreSet with only the label ``columns`` (truth and every member's scores)."""
    columns = list(columns)
    return dataclasses.replace(
        scores,
        y_true=np.asarray(scores.y_true)[:, columns],
        scores={k: np.asarray(v)[:, columns] for k, v in scores.scores.items()},
        labels=tuple(scores.labels[c] for c in columns),
    )


def read_internal(path: str | Path) -> pd.DataFrame:
    """The AUROCs of an earlier report (a report folder or its aucs.csv): columns member, label,
    auroc, ci_low, ci_high, n_pos, n."""
    path = Path(path)
    file = path / "aucs.csv" if path.is_dir() else path
    fix = "pass an earlier cxr.evaluate report folder (or its aucs.csv)"
    if not file.is_file():
        raise CxrError(f"{file}: no aucs.csv here — {fix}")
    try:
        frame = pd.read_csv(file)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise CxrError(f"{file}: unreadable ({err}) — {fix}") from None
    missing = [c for c in ("member", "label", "auroc") if c not in frame.columns]
    if missing:
        raise CxrError(f"{file}: missing column(s) {missing} — {fix}")
    return frame


def focus_rows(aucs: pd.DataFrame) -> pd.DataFrame:
    """One member's per-label rows, by label: the ensemble where there is one, else the last member."""
    members = list(dict.fromkeys(aucs["member"]))
    focus = "ensemble" if "ensemble" in members else members[-1]
    rows = aucs[(aucs["member"] == focus) & (aucs["label"] != "mean")]
    return rows.set_index("label")


def comparison(
    external: pd.DataFrame, internal: pd.DataFrame | None, dropped: dict[str, str] | None = None
) -> pd.DataFrame:
    """Per shared label: the external AUROC (this evaluation) [with CI], and given ``internal``
    the internal one and delta = external − internal; a ``mean`` row over the labels that have
    both (paired by label); then one row per dropped label with its reason (column ``dropped``)."""
    ext = focus_rows(external)
    table = pd.DataFrame(
        {
            "label": ext.index,
            "external_auroc": ext["auroc"].to_numpy(dtype=np.float64),
            "external_ci_low": ext.get("ci_low", pd.Series(np.nan, index=ext.index)).to_numpy(dtype=np.float64),
            "external_ci_high": ext.get("ci_high", pd.Series(np.nan, index=ext.index)).to_numpy(dtype=np.float64),
            "external_n": ext.get("n", pd.Series(np.nan, index=ext.index)).to_numpy(dtype=np.float64),
        }
    )
    table["dropped"] = ""
    tail = pd.DataFrame({"label": list(dropped or {}), "dropped": list((dropped or {}).values())})
    if internal is None:
        return pd.concat([table, tail], ignore_index=True)
    inner = focus_rows(internal)
    table["internal_auroc"] = [float(inner["auroc"].get(name, np.nan)) for name in table["label"]]
    table["delta"] = table["external_auroc"] - table["internal_auroc"]
    paired = table["delta"].notna()
    mean = {
        "label": "mean",
        "external_auroc": float(table.loc[paired, "external_auroc"].mean()) if paired.any() else np.nan,
        "internal_auroc": float(table.loc[paired, "internal_auroc"].mean()) if paired.any() else np.nan,
        "delta": float(table.loc[paired, "delta"].mean()) if paired.any() else np.nan,
    }
    return pd.concat([table, pd.DataFrame([{**mean, "dropped": ""}]), tail], ignore_index=True)


def write_comparison(out: Path, table: pd.DataFrame) -> Path:
    path = Path(out) / CROSS_SITE_CSV
    with atomic_write(path, "w") as fh:
        table.to_csv(fh, index=False, lineterminator="\n", float_format="%.6f")
    return path


def section(
    plan: LabelPlan | None, dropped: dict[str, str], table: pd.DataFrame, compare_to: str | None, split: str
) -> list[str]:
    """report.md's "External validation" section (markdown lines)."""

    def fmt(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"

    lines = [f"## External validation — split `{split}`", ""]
    if plan is not None:
        lines.append(
            f"- evaluated on the {int(((table['label'] != 'mean') & (table['dropped'].fillna('') == '')).sum())} label(s) the model and the shards "
            "share by name (after packing's label mapping)"
        )
    if dropped:
        lines.append("- dropped: " + "; ".join(f"{name} ({why})" for name, why in dropped.items()))
    if compare_to:
        lines.append(f"- internal AUROCs from `{compare_to}`; delta = external − internal, paired by label")
    lines.append("")
    columns = (
        ["label", "internal_auroc", "external_auroc", "delta"] if "delta" in table else ["label", "external_auroc"]
    )
    header = {"internal_auroc": "internal AUROC", "external_auroc": "external AUROC", "delta": "Δ (ext − int)"}
    lines.append("| " + " | ".join(header.get(c, c) for c in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for _, row in table[table["dropped"].fillna("") == ""].iterrows():
        cells = [str(row["label"])] + [fmt(row.get(c)) for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"All numbers are in `{CROSS_SITE_CSV}`.", ""]
    return lines


def format_table(table: pd.DataFrame, dropped: dict[str, str]) -> str:
    """The stdout lines: the comparison and the dropped labels."""
    shown = table[table["dropped"].fillna("") == ""].drop(columns="dropped")
    text = shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="")
    if dropped:
        text += "\ndropped: " + "; ".join(f"{name} ({why})" for name, why in dropped.items())
    return text
