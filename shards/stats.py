"""`python -m shards stats`: label prevalence per split of a splits table."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cxrbase.errors import CxrError
from cxrbase.labels import NO_FINDING, missing_nih_labels, table_labels
from shards.manifest import split_warnings
from shards.records import SPLITS, read_table

STATS_COLUMNS = ("split", "label", "positives", "images", "prevalence_pct")


def _present_splits(df: pd.DataFrame) -> list[str]:
    unknown = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if unknown:
        raise CxrError(f"splits table: unknown split name(s) {unknown} — expected {list(SPLITS)}")
    return [s for s in SPLITS if (df["split"] == s).any()]


def _labels(df: pd.DataFrame) -> list[str]:
    """The table's label columns (the 14 NIH ones, or a generic table's), without No Finding."""
    return [c for c in table_labels(df.columns) if c != NO_FINDING]


def _check_columns(df: pd.DataFrame) -> None:
    missing = [c for c in ("split",) if c not in df.columns] + ([] if _labels(df) else ["a label column"])
    missing += missing_nih_labels(df.columns)
    if missing:
        raise CxrError(f"splits table: missing column(s) {missing} — write it with `python -m shards split`")


def positives_by_split(df: pd.DataFrame) -> pd.DataFrame:
    """Positive-image counts: index = present splits (canonical order), columns = 14 labels + No Finding,
    plus an `images` column."""
    _check_columns(df)
    splits = _present_splits(df)
    y = (df[_labels(df)].to_numpy(dtype=np.float64) == 1).astype(np.int64)  # unknown/uncertain: not positive
    frame = pd.DataFrame(y, columns=_labels(df))
    frame[NO_FINDING] = (y.sum(axis=1) == 0).astype(np.int64)
    frame["images"] = 1
    frame["split"] = df["split"].to_numpy()
    return frame.groupby("split").sum().loc[splits]


def known_by_split(df: pd.DataFrame) -> pd.DataFrame:
    """Per split and label the images whose label is known (not empty/NaN, not uncertain -1), plus
    No Finding (= images): the denominators of the prevalences. Index and columns as positives_by_split."""
    splits = _present_splits(df)
    y = df[_labels(df)].to_numpy(dtype=np.float64)
    frame = pd.DataFrame(np.isin(y, (0.0, 1.0)).astype(np.int64), columns=_labels(df))
    frame[NO_FINDING] = 1
    frame["split"] = df["split"].to_numpy()
    return frame.groupby("split").sum().loc[splits]


def prevalence_matrix(df: pd.DataFrame) -> pd.DataFrame:
    """Unrounded prevalence in percent over the images that know the label: index = splits,
    columns = 14 labels + No Finding."""
    counts = positives_by_split(df)
    columns = [*_labels(df), NO_FINDING]
    return counts[columns].div(known_by_split(df)[columns]) * 100.0


def label_spread(df: pd.DataFrame) -> pd.Series:
    """Per-label prevalence spread (max − min across splits, percentage points), 14 labels."""
    prev = prevalence_matrix(df)[_labels(df)]
    return prev.max(axis=0) - prev.min(axis=0)


def prevalence_table(df: pd.DataFrame) -> pd.DataFrame:
    """Long prevalence table of a splits table.

    Columns exactly split,label,positives,images,prevalence_pct; one row per split
    (train, val, test order, present ones only) × label (canonical order, then
    "No Finding" = images with all 14 labels 0); prevalence in percent, 2 decimals. `images` is
    the images that know the label (all of the split's unless the table has unknown or uncertain
    cells); prevalence is NaN for a label no image of the split knows.
    """
    counts, known = positives_by_split(df), known_by_split(df)
    rows = []
    for split, row in counts.iterrows():
        for label in (*_labels(df), NO_FINDING):
            pos, n = int(row[label]), int(known.at[split, label])
            rows.append((split, label, pos, n, round(100.0 * pos / n, 2) if n else float("nan")))
    return pd.DataFrame(rows, columns=list(STATS_COLUMNS))


def _wide_cells(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    splits = list(dict.fromkeys(table["split"]))
    images = table.groupby("split", sort=False)["images"].max()  # No Finding's row: every image
    header = ["label", *[f"{s} (n={images[s]:,})" for s in splits]]
    body = []
    for label in dict.fromkeys(table["label"]):
        sub = table[table["label"] == label].set_index("split")
        body.append([label, *[f"{sub.at[s, 'positives']:,} ({sub.at[s, 'prevalence_pct']:.2f}%)" for s in splits]])
    return header, body


def format_prevalence(table: pd.DataFrame, fmt: str = "table") -> str:
    """Render a prevalence_table as `csv` (long), `markdown` or aligned `table` (label × split)."""
    if fmt == "csv":
        buf = io.StringIO()
        table.to_csv(buf, index=False, float_format="%.2f", lineterminator="\n")
        return buf.getvalue().rstrip("\n")
    header, body = _wide_cells(table)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    if fmt != "table":
        raise CxrError(f"unknown format '{fmt}' — use table, csv or markdown")
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def aligned(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([aligned(header), *map(aligned, body)])


def run(args) -> int:
    """CLI: print the prevalence table of `args.splits` in `args.format`."""
    df = read_table(Path(args.splits))
    print(format_prevalence(prevalence_table(df), args.format))
    counts = positives_by_split(df)
    labels = _labels(df)
    for warning in split_warnings(
        {s: int(r["images"]) for s, r in counts.iterrows()},
        {s: {n: int(r[n]) for n in labels} for s, r in counts.iterrows()},
        str(args.splits),
        known_by_split={s: {n: int(r[n]) for n in labels} for s, r in known_by_split(df).iterrows()},
    ):
        print(f"warning: {warning}", file=sys.stderr)
    return 0
