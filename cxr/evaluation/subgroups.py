"""Subgroups of an evaluated split: the per-image columns they come from, the groupings, and
per-group AUROC, gaps and under-diagnosis (Seyyed-Kalantari et al. 2021).

The per-image columns (``ScoreSet.meta``) come from the splits table the shards were packed
from (``shards.records.read_table``, found through the manifest's ``splits_file`` or given
with ``--splits``) joined by image key: ``patient``, ``age``, ``sex``, ``view`` and any
other column of the table, plus ``followup`` read off NIH image names
(``PPPPPPPP_FFF`` → FFF, 0 = the patient's first study). predictions.parquet carries them
(``cxr.evaluation.predictions``), so ``--from-predictions`` needs no table.

A grouping is named by a column (``sex``, ``view``, or any column; NIH CSV headers
``Patient Gender``, ``View Position``, ``Follow-up #``, ``Patient Age``, ``Patient ID`` are
accepted for the table's names) or ``age:20,40,60,80`` (bands [0,20), [20,40) … [80, ∞));
``followup`` splits first studies from follow-ups. Groups compare against the largest group
of their grouping (the reference): the AUROC gap with a percentile-bootstrap CI over the
evaluation's resamples (patients where known) and an unpaired DeLong test, Holm-adjusted
over the labels of that comparison.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrbase.errors import CxrError

DEFAULT_GROUPINGS = ("sex", "age:20,40,60,80", "view", "followup")
ALIASES = {
    "patient gender": "sex",
    "patient sex": "sex",
    "view position": "view",
    "follow-up #": "followup",
    "follow-up": "followup",
    "patient age": "age",
    "patient id": "patient",
}
META_PREFIX = "meta_"  # the per-image columns in predictions.parquet
_NIH_KEY = re.compile(r"^\d{8}_(\d{3})$")


# --------------------------------------------------------------- per-image columns ---


def followup(keys: Sequence[str]) -> pd.Series:
    """Follow-up number of NIH image keys (``00000001_002`` → 2); NaN for other names."""
    numbers = [int(m.group(1)) if (m := _NIH_KEY.match(str(k))) else np.nan for k in keys]
    return pd.Series(numbers, dtype="float64")


def meta_from_table(keys: np.ndarray, table_path: str | Path) -> pd.DataFrame:
    """The splits table's columns (but ``image``, ``split`` and the labels) for ``keys`` [N], in
    key order, plus ``followup``. A key missing from the table is an error."""
    from cxrbase.labels import table_labels
    from shards.records import image_key, read_table

    table = read_table(table_path)
    table.index = [image_key(str(i)) for i in table["image"]]  # the shard keys (a path → its digest)
    missing = [k for k in map(str, keys) if k not in table.index]
    if missing:
        raise CxrError(
            f"{table_path}: {len(missing)} evaluated images are not in this splits table (first "
            f"{missing[:3]}) — pass the table the shards were packed from (--splits)"
        )
    drop = {"image", "split", *table_labels(table.columns), "No Finding"}
    meta = table.loc[[str(k) for k in keys], [c for c in table.columns if c not in drop]].reset_index(drop=True)
    meta["followup"] = followup(keys).to_numpy()
    return meta


# ---------------------------------------------------------------------- groupings ---


def grouping_column(spec: str, meta: pd.DataFrame) -> tuple[str, pd.Series]:
    """(name, group of each image as str, NaN where unknown) for one grouping spec."""
    name, _, bands = spec.partition(":")
    column = ALIASES.get(name.strip().lower(), name.strip())
    if column not in meta.columns:
        raise CxrError(
            f"--subgroups {spec!r}: no column {column!r} in the split's table (has "
            f"{sorted(meta.columns)}) — name one of those, or age:20,40,60,80"
        )
    values = meta[column]
    if bands or column == "age":
        try:
            edges = [float(v) for v in (bands or "20,40,60,80").split(",")]
        except ValueError:
            raise CxrError(f"--subgroups {spec!r}: bands must be numbers — e.g. age:20,40,60,80") from None
        if edges != sorted(edges) or len(set(edges)) != len(edges):
            raise CxrError(f"--subgroups {spec!r}: band edges must increase — e.g. age:20,40,60,80")
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        full = [-np.inf, *edges, np.inf]
        names = [
            f"<{_num(edges[0])}",
            *(f"{_num(a)}–{_num(b)}" for a, b in zip(edges, edges[1:])),
            f"≥{_num(edges[-1])}",
        ]
        index = np.searchsorted(full, numbers, side="right") - 1
        groups = pd.Series([names[i] if np.isfinite(x) else np.nan for i, x in zip(index, numbers)])
        return f"{column} bands", groups
    if column == "followup":
        numbers = pd.to_numeric(values, errors="coerce")
        groups = pd.Series(np.where(numbers == 0, "first study", "follow-up"), dtype=object)
        return column, groups.where(numbers.notna().to_numpy())
    return column, values.map(lambda v: np.nan if pd.isna(v) else str(v)).reset_index(drop=True)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ---------------------------------------------------------------------- analysis ---


SUBGROUP_COLUMNS = (
    "grouping",
    "group",
    "metric",
    "label",
    "n",
    "n_patients",
    "n_pos",
    "value",
    "ci_low",
    "ci_high",
    "few_positives",
    "reference",
    "gap",
    "gap_low",
    "gap_high",
    "p",
    "p_holm",
)  # subgroups.csv


def subgroup_table(
    y: np.ndarray,
    s: np.ndarray,
    labels: Sequence[str],
    meta: pd.DataFrame,
    specs: Sequence[str],
    resamples: Any,
    threshold: np.ndarray,
    alpha: float = 0.05,
    few: int = 10,
    notes: Any = None,
) -> pd.DataFrame:
    """Per grouping, group and label: AUROC with CI, gap to the reference group with CI, unpaired
    DeLong p and Holm-adjusted p; plus one ``underdiagnosis`` row per group (sick images — any
    label positive — with no label at or above ``threshold`` [L], i.e. called "No Finding").

    resamples: a :class:`cxr.evaluation.stats.Resamples` of the split (or None: no CIs).
    """
    y = np.asarray(y, dtype=np.float64)  # NaN: unknown label, left out of each label's AUROC
    sick = (y == 1).any(axis=1)  # a known positive
    called_healthy = ~(s >= threshold).any(axis=1)
    missed = sick & called_healthy
    rows: list[dict[str, Any]] = []
    for spec in specs:
        name, groups = grouping_column(spec, meta)
        known = groups.notna().to_numpy()
        names = [g for g in pd.unique(groups[known])]
        names.sort(key=lambda g: (-int((groups == g).sum()), str(g)))
        if len(names) < 2:
            if notes is not None:
                notes.items.append(f"subgroups {spec!r}: fewer than two groups on this split — skipped")
            continue
        rows += _grouping_rows(name, groups, names, y, s, labels, meta, resamples, missed, sick, alpha, few)
    return pd.DataFrame(rows).reindex(columns=list(SUBGROUP_COLUMNS))


def _grouping_rows(
    name: str,
    groups: pd.Series,
    names: list,
    y: np.ndarray,
    s: np.ndarray,
    labels: Sequence[str],
    meta: pd.DataFrame,
    resamples: Any,
    missed: np.ndarray,
    sick: np.ndarray,
    alpha: float,
    few: int,
) -> list[dict[str, Any]]:
    """subgroup_table's rows of one grouping (its groups ``names``, the largest first: the reference)."""
    from cxr.evaluation.metrics import per_label_auroc
    from cxr.evaluation.stats import bootstrap_auroc, holm, unpaired_delong

    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    rows: list[dict[str, Any]] = []
    reference = names[0]
    masks = {g: (groups == g).to_numpy() for g in names}
    boot: dict[str, dict[str, Any]] = {}
    for g in names:
        m = masks[g]
        if resamples is not None:
            with _quiet():
                boot[g] = bootstrap_auroc(y[m], s[m], counts=resamples.counts[m], alpha=alpha)
        else:
            with _quiet():
                boot[g] = {"auroc": per_label_auroc(y[m], s[m])}
    under = (
        resamples.sums(np.column_stack([np.column_stack([missed & masks[g], sick & masks[g]]) for g in names]))
        if resamples is not None
        else None
    )
    comparisons = {}
    for g in names[1:]:
        tests = [
            unpaired_delong(y[masks[g], c], s[masks[g], c], y[masks[reference], c], s[masks[reference], c])
            for c in range(len(labels))
        ]
        p = np.array([t["p"] for t in tests])
        comparisons[g] = (p, holm(p))
    for g in names:
        m = masks[g]
        n_pos = (y[m] == 1).sum(axis=0)
        b = boot[g]
        patients = int(pd.unique(meta.loc[m, "patient"]).size) if "patient" in meta else None
        for c, label in enumerate(labels):
            row = {
                "grouping": name,
                "group": g,
                "metric": "auroc",
                "label": label,
                "n": int(m.sum()),
                "n_patients": patients,
                "n_pos": int(n_pos[c]),
                "value": b["auroc"][c],
                "ci_low": b.get("ci_low", np.full(len(labels), np.nan))[c],
                "ci_high": b.get("ci_high", np.full(len(labels), np.nan))[c],
                "few_positives": bool(n_pos[c] < few),
                "reference": reference,
            }
            if g != reference:
                row["gap"] = b["auroc"][c] - boot[reference]["auroc"][c]
                if resamples is not None:
                    with _quiet():
                        diff = b["samples"][:, c] - boot[reference]["samples"][:, c]
                        row["gap_low"], row["gap_high"] = (
                            np.nanpercentile(diff, q) if np.isfinite(diff).any() else (np.nan, np.nan)
                        )
                row["p"], row["p_holm"] = comparisons[g][0][c], comparisons[g][1][c]
            rows.append(row)
        rows.append(_underdiagnosis_row(name, g, names, masks, patients, missed, sick, under, alpha, few))
    return rows


def _underdiagnosis_row(
    name: str,
    g: Any,
    names: list,
    masks: dict[Any, np.ndarray],
    patients: int | None,
    missed: np.ndarray,
    sick: np.ndarray,
    under: np.ndarray | None,
    alpha: float,
    few: int,
) -> dict[str, Any]:
    """The ``underdiagnosis`` row of group ``g`` with its Wilson interval and, beside the reference
    group ``names[0]``, the gap with its bootstrap CI (``under``: per resample, missed and sick counts)."""
    from cxr.evaluation.metrics import wilson_interval

    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    reference, gi, m = names[0], names.index(g), masks[g]
    k, n = int(missed[m].sum()), int(sick[m].sum())
    low, high = wilson_interval(k, n, alpha)
    row = {
        "grouping": name,
        "group": g,
        "metric": "underdiagnosis",
        "label": "No Finding (FPR)",
        "n": int(m.sum()),
        "n_patients": patients,
        "n_pos": n,
        "value": k / n if n else np.nan,
        "ci_low": float(low),
        "ci_high": float(high),
        "few_positives": bool(n < few),
        "reference": reference,
    }
    if g != reference and under is not None:
        ref = names.index(reference)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = under[:, 2 * gi] / under[:, 2 * gi + 1]
            ref_rate = under[:, 2 * ref] / under[:, 2 * ref + 1]
        ref_n = int(sick[masks[reference]].sum())
        row["gap"] = row["value"] - (missed[masks[reference]].sum() / ref_n if ref_n else np.nan)
        diff = rate - ref_rate
        row["gap_low"], row["gap_high"] = np.nanpercentile(diff, q) if np.isfinite(diff).any() else (np.nan, np.nan)
    return row


class _quiet:
    """Silence the metrics' undefined-label warnings inside a group (the table shows NaN)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def packed_table(shards: str | Path) -> Path | None:
    """The splits table a shards folder was packed from (its manifest's ``splits_file``), if it is at hand."""
    from shards import remote
    from shards.manifest import load_manifest

    table = load_manifest(shards).get("splits_file")
    if not table or not Path(table).is_absolute() and remote.is_url(shards):
        return None  # a table beside shards at a URL: not read from there (pass --splits)
    path = Path(table) if Path(table).is_absolute() else Path(shards) / table
    return path if path.is_file() else None


def attach_meta(per_split: dict[str, Any], table: str | Path | None, strict: bool = True) -> dict[str, Any]:
    """Each split's ScoreSet with ``meta`` from the splits ``table`` (unchanged when None).

    strict=False (the table was found through the shards' manifest, not named by the user): a table
    that does not list the evaluated images leaves the splits without meta and prints why, instead
    of failing the evaluation."""
    import dataclasses
    import sys

    if table is None:
        return per_split
    try:
        return {split: dataclasses.replace(s, meta=meta_from_table(s.keys, table)) for split, s in per_split.items()}
    except CxrError as err:
        if strict:
            raise
        print(f"note: no subgroups and image-level bootstrap — {err}", file=sys.stderr)
        return per_split
