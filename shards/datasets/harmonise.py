"""The label harmonisation table (labelmap.csv, shipped data) and its application.

Each row maps one finding of a data set (``source``, its own spelling) to a canonical label
(``target``, NIH's 14 names). ``relation``: ``same`` / ``renamed`` (the source is that label),
``merged`` (the source covers several targets at once — ``Mass|Nodule`` ← CheXpert's Lung Lesion —
so it is never split into one of them: under the NIH-14 target those labels stay unknown),
``unmapped`` (no counterpart; listed so the table documents every finding), ``no_finding``
(target ``*``: the data set's "no finding" column; where it is 1, every target the data set maps
and leaves blank becomes 0 — CheXpert's labeler sets it only when no pathology is positive or
uncertain). A target that no row
of a data set feeds is unknown (NA) for that data set, never negative.
"""

from __future__ import annotations

import csv
import hashlib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

TABLE = "labelmap.csv"
FIELDS = ("dataset", "source", "target", "relation", "source_doc")
RELATIONS = ("same", "renamed", "merged", "unmapped", "no_finding")
DIRECT = ("same", "renamed")  # relations that set a target's value


@cache
def _table_text() -> str:
    return resources.files("shards.datasets").joinpath(TABLE).read_text(encoding="utf-8")


def mapping_rows(dataset: str | None = None) -> list[dict[str, str]]:
    """The rows of the shipped table (of one data set when given), in file order."""
    rows = list(csv.DictReader(_table_text().splitlines()))
    for i, row in enumerate(rows, start=2):
        if tuple(row) != FIELDS or row["relation"] not in RELATIONS:
            raise CxrError(f"shards/datasets/{TABLE}: line {i} is malformed — reinstall cxr")
    return [r for r in rows if dataset is None or r["dataset"] == dataset]


def table_sha256() -> str:
    return hashlib.sha256(_table_text().encode()).hexdigest()


def sources_of(dataset: str) -> dict[str, list[str]]:
    """target → the data set's source findings that set it (same/renamed), for the 14 NIH labels."""
    out: dict[str, list[str]] = {name: [] for name in LABELS}
    for row in mapping_rows(dataset):
        if row["relation"] in DIRECT:
            out[row["target"]].append(row["source"])
    return out


def harmonise(source: Any, dataset: str) -> Any:
    """Source-finding columns (values 1, 0, −1, NA) → the 14 NIH columns as pandas Int8.

    Several sources of one target combine as: any 1 → 1; else any −1 → −1; else any 0 → 0; else NA.
    A target with no source in ``dataset`` is NA throughout (unknown, not negative). Where the
    data set's ``no_finding`` source is 1, a mapped target still NA becomes 0.
    """
    import numpy as np
    import pandas as pd

    nothing = np.zeros(len(source), dtype=bool)
    for row in mapping_rows(dataset):
        if row["relation"] == "no_finding" and row["source"] in source.columns:
            nothing |= source[row["source"]].to_numpy(dtype=np.float64, na_value=np.nan) == 1
    out = {}
    for target, names in sources_of(dataset).items():
        present = [n for n in names if n in source.columns]
        if not present:
            out[target] = pd.Series(np.nan, index=source.index).astype("Int8")
            continue
        values = source[present].to_numpy(dtype=np.float64, na_value=np.nan)
        result = np.full(len(source), np.nan)
        for level in (0.0, -1.0, 1.0):  # later levels win: 1 over −1 over 0
            result[(values == level).any(axis=1)] = level
        result[nothing & np.isnan(result)] = 0.0
        out[target] = pd.Series(result, index=source.index).astype("Int8")
    return pd.DataFrame(out, index=source.index)


def describe(dataset: str) -> list[str]:
    """One line per canonical label: where its values come from in ``dataset`` (for split's summary)."""
    by_target = sources_of(dataset)
    merged = [r for r in mapping_rows(dataset) if r["relation"] == "merged"]
    lines = []
    for target in LABELS:
        if by_target[target]:
            lines.append(f"{target} ← {' | '.join(by_target[target])}")
        else:
            via = [r["source"] for r in merged if target in r["target"].split("|")]
            lines.append(f"{target}: unknown" + (f" ({' / '.join(via)} is a merged label, not split)" if via else ""))
    return lines


def label_mapping(splits: Any) -> dict[str, Any] | None:
    """The manifest's ``label_mapping``: the shipped rows for the data sets of a splits table's
    ``dataset`` column, with the table's sha256; None for a table without that column (NIH, generic)."""
    import pandas as pd

    if isinstance(splits, pd.DataFrame):
        if "dataset" not in splits.columns:
            return None
        names = splits["dataset"]
    else:
        path = Path(splits)
        try:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                if "dataset" not in pq.read_schema(path).names:
                    return None
                names = pd.read_parquet(path, columns=["dataset"])["dataset"]
            else:
                names = pd.read_csv(path, usecols=lambda c: c == "dataset", dtype=str)
                if "dataset" not in names.columns:
                    return None
                names = names["dataset"]
        except Exception as err:  # read_splits has already read this file; this is belt and braces
            raise CxrError(
                f"{path}: unreadable 'dataset' column ({err}) — re-write it with `cxr-shards split`"
            ) from None
    datasets = sorted(names.dropna().astype(str).unique())
    known = {r["dataset"] for r in mapping_rows()}
    unknown = [d for d in datasets if d not in known]
    if unknown:
        raise CxrError(
            f"{splits if not isinstance(splits, pd.DataFrame) else 'splits table'}: dataset {unknown} has no rows "
            f"in the label harmonisation table (known: {sorted(known)}) — write the table with `cxr-shards split --dataset`"
        )
    return {
        "table": f"shards/datasets/{TABLE}",
        "sha256": table_sha256(),
        "datasets": datasets,
        "rows": [{k: r[k] for k in FIELDS} for d in datasets for r in mapping_rows(d)],
    }
