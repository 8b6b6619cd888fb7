"""The pipeline every adapter shares: read CSVs with clear errors, filter views, harmonise labels,
assign patient-level splits, write the table (`cxr-shards split --dataset NAME --root ROOT`).

An adapter module has ``load(root, args) -> Loaded``: one row per image with the columns
``image`` (path relative to ROOT), ``patient`` (int64, the data set's own id), ``age`` (float, NaN unknown), ``sex``
(M/F/None), ``view`` (PA/AP/None), ``frontal`` (bool), ``official`` (train/val/test, or None
when the data set has no official split) and the data set's own finding columns (1, 0, −1, NA).

The table :func:`build` writes puts each data set's patients in a namespace of their own
(:func:`namespaced_patients`), so the tables of two data sets can be concatenated and split as a
union without one data set's patient 17 meeting another's.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrbase.errors import CxrError
from cxrbase.labels import LABELS
from shards.datasets import ADAPTERS
from shards.datasets.harmonise import describe, harmonise
from shards.records import SPLITS

BASE_COLUMNS = ("image", "patient", "age", "sex", "view", "frontal", "official")

# Patient namespaces: the table's patient = NAMESPACES[dataset] · PATIENT_SPAN + the data set's own id.
# Integers, not "chexpert:00001" strings, because the splits table, the shards' records and every
# reader of them (the evaluator's patient bootstrap included) carry the patient as an int64; the
# decimal offset keeps the data set's own id readable in the last 17 digits. 10¹⁷ holds the largest
# own id an adapter makes (stable_ids: < 2⁵⁶ ≈ 7.2·10¹⁶), and int64 holds namespaces up to 91.
# NIH (shards.splits) and generic labelled CSVs keep their ids as they are: namespace 0.
PATIENT_SPAN = 10**17
NAMESPACES = {"chexpert": 1, "mimic": 2, "padchest": 3, "vindr": 4}


@dataclass
class Loaded:
    """What an adapter read: the rows, its finding columns and the rows it skipped (counted)."""

    frame: pd.DataFrame
    findings: list[str]
    official: bool  # the data set publishes a split
    read: list[str]  # files read, for the summary
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason → examples ("file line N: …")
    skipped_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # other one-line facts for the summary

    def skip(self, reason: str, examples: Sequence[str], count: int) -> None:
        if count:
            self.skipped[reason] = list(examples[:3])
            self.skipped_counts[reason] = self.skipped_counts.get(reason, 0) + int(count)


def find_file(root: Path, names: Sequence[str], what: str, fix: str) -> Path:
    """The first of ``names`` (relative to root; .gz variants tried) that exists, else CxrError."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise CxrError(f"{root / names[0]}: {what} not found (also tried {', '.join(names[1:]) or '.gz'}) — {fix}")


def read_csv(path: Path, columns: Sequence[str], fix: str, **kwargs: Any) -> pd.DataFrame:
    """Read a CSV and check it has ``columns`` (named as the data set documents them)."""
    try:
        frame = pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise CxrError(f"{path}: not found — {fix}") from None
    except Exception as err:  # pandas raises ParserError, UnicodeDecodeError, EmptyDataError …
        raise CxrError(f"{path}: unreadable CSV ({type(err).__name__}: {err}) — {fix}") from None
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise CxrError(f"{path}: missing column(s) {absent} (has {list(frame.columns)[:8]}…) — {fix}")
    return frame


def fail_rows(path: Path, frame: pd.DataFrame, bad: Any, what: str, fix: str, column: str | None = None) -> None:
    """CxrError naming the file, the first bad row's line (header = line 1) and value, and the fix."""
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raw = frame[column].iloc[i] if column else None
        value = f" {column}={(raw.item() if isinstance(raw, np.generic) else raw)!r}" if column else ""
        raise CxrError(
            f"{path}: line {int(frame.index[i]) + 2}{value}: {what} ({int(bad.sum()):,} row(s) in all) — {fix}"
        )


def label_values(path: Path, frame: pd.DataFrame, columns: Sequence[str], fix: str) -> pd.DataFrame:
    """The finding columns as float (1, 0, −1, NaN); CxrError on any other value."""
    out = frame[list(columns)].apply(pd.to_numeric, errors="coerce")
    for column in columns:
        bad = (out[column].isna() & frame[column].notna()) | ~(out[column].isin([1, 0, -1]) | out[column].isna())
        fail_rows(path, frame, bad, "label value not 1, 0, -1 or blank", fix, column)
    return out.astype(np.float64)


def stable_ids(values: Sequence[str]) -> np.ndarray:
    """Text identifiers → int64 (first 7 bytes of BLAKE2b: non-negative, the same on every machine;
    a collision among 10⁶ ids has probability ≈ 7·10⁻⁶). For data sets whose patient ids are not integers."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=7).digest(), "big") for v in values),
        dtype=np.int64,
        count=len(values),
    )


def namespaced_patients(dataset: str, patients: Any, where: str) -> np.ndarray:
    """The data set's own patient ids (int, 0 ≤ id < PATIENT_SPAN) → ids unique across data sets:
    ``NAMESPACES[dataset] · PATIENT_SPAN + id``; ``id = patient % PATIENT_SPAN`` gives them back."""
    own = np.asarray(patients, dtype=np.int64)
    bad = (own < 0) | (own >= PATIENT_SPAN)
    if bad.any():
        raise CxrError(
            f"{where}: {int(bad.sum()):,} {dataset} patient id(s) outside 0…10¹⁷ (first {int(own[bad][0])}) "
            "— the adapter must give non-negative ids below 10¹⁷ (hash longer ids with stable_ids)"
        )
    return NAMESPACES[dataset] * PATIENT_SPAN + own


def check_official_patient_level(frame: pd.DataFrame, where: str) -> None:
    """An official split that puts one patient in two splits is refused, naming the files."""
    per = frame.groupby("patient")["official"].nunique()
    both = per.index[per > 1]
    if len(both):
        p = both[0]
        mine = frame[frame["patient"] == p]
        raise CxrError(
            f"{where}: {len(both):,} patient(s) in more than one official split (first: patient {p} in "
            f"{sorted(mine['official'].unique())}, e.g. {mine['image'].iloc[0]}) — use the files of one release"
        )


def official_split(frame: pd.DataFrame, val_fraction: float, seed: int) -> np.ndarray:
    """The published split; when it has no val, a seeded ``val_fraction`` of train patients becomes val."""
    split = frame["official"].to_numpy(dtype=object).copy()
    if not (split == "val").any() and val_fraction > 0:
        train_patients = np.unique(frame["patient"].to_numpy()[split == "train"])
        n_val = int(round(val_fraction * train_patients.size))
        chosen = np.random.default_rng(seed).permutation(train_patients)[:n_val]
        split[(split == "train") & frame["patient"].isin(chosen).to_numpy()] = "val"
    return split


def assign(frame: pd.DataFrame, labels: pd.DataFrame, args: Any, scheme: str) -> tuple[np.ndarray, Any]:
    """Split names per row for the scheme; (names, fractions or None)."""
    from shards.splits import DEFAULT_FRACTIONS, assign_by_patient, parse_fractions

    if scheme == "official":
        if args.fractions is not None:
            raise CxrError("--fractions applies to stratified/random — official uses the published split")
        if not 0 <= args.val_fraction < 1:
            raise CxrError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
        return official_split(frame, args.val_fraction, args.seed), None
    fractions = parse_fractions(args.fractions, DEFAULT_FRACTIONS[scheme])
    positives = (labels.fillna(0).to_numpy(dtype=np.int64) == 1).astype(np.int64)  # −1 and unknown: not positive
    meta = pd.DataFrame(positives, columns=list(LABELS))
    meta.insert(0, "patient", frame["patient"].to_numpy())
    split = assign_by_patient(
        meta, scheme, fractions, args.seed, getattr(args, "method", "greedy"), where=str(args.root)
    )
    return split, fractions


def build(loaded: Loaded, dataset: str, args: Any) -> pd.DataFrame:
    """The splits table: image, patient, split, the 14 labels (Int8: 1/0/−1/NA), age, sex, view, dataset."""
    frame = loaded.frame
    if not getattr(args, "all_views", False):
        lateral = ~frame["frontal"].to_numpy(dtype=bool)
        loaded.skip("not frontal (pass --all-views to keep)", frame["image"][lateral].tolist()[:3], lateral.sum())
        frame = frame[~lateral]
    if frame.empty:
        raise CxrError(f"{args.root}: no {dataset} image left to split — check --root and the view filter")
    frame = frame.reset_index(drop=True)
    frame["patient"] = namespaced_patients(dataset, frame["patient"], str(args.root))
    dup = frame["image"].duplicated(keep=False).to_numpy()
    if dup.any():
        raise CxrError(
            f"{args.root}: {int(dup.sum()):,} rows name the same image (first {frame['image'][dup].iloc[0]}) "
            f"— each image must be listed once; use the {dataset} files of one release"
        )
    labels = harmonise(frame[loaded.findings], dataset)
    scheme = args.scheme or ("official" if loaded.official else "stratified")
    if scheme == "official" and not loaded.official:
        raise CxrError(f"--scheme official: {dataset} publishes no split — use --scheme stratified or random")
    split, fractions = assign(frame, labels, args, scheme)
    args.scheme_used, args.fractions_used = scheme, fractions
    table = pd.DataFrame({"image": frame["image"], "patient": frame["patient"], "split": split})
    table = pd.concat([table, labels], axis=1)
    table["age"] = frame["age"].astype(np.float64)
    table["sex"] = frame["sex"].astype(object).where(frame["sex"].isin(["M", "F"]), None)
    table["view"] = frame["view"].astype(object).where(frame["view"].isin(["PA", "AP"]), None)
    table["dataset"] = dataset
    return table


def run_split(args: Any) -> int:
    """`cxr-shards split --dataset NAME --root ROOT --out TABLE`."""
    from shards.splits import check_patient_disjoint, write_splits

    start = time.perf_counter()
    if args.restrict_to or args.with_no_finding or args.metadata:
        raise CxrError(
            f"--dataset {args.dataset}: --metadata, --restrict-to and --with-no-finding are for NIH — "
            "the adapter reads the data set's own files under --root"
        )
    if not args.root:
        raise CxrError(f"--dataset {args.dataset}: pass --root, the folder of the download (docs/datasets.md)")
    root = Path(args.root)
    if not root.is_dir():
        raise CxrError(f"{root}: --root is not a folder — pass the folder the {args.dataset} download unpacked to")
    out = Path(args.out)
    if out.suffix not in (".parquet", ".csv"):
        raise CxrError(f"{out}: unknown table format — name it .parquet or .csv")
    loaded = importlib.import_module(ADAPTERS[args.dataset]).load(root, args)
    n_read = len(loaded.frame) + sum(loaded.skipped_counts.values())
    table = build(loaded, args.dataset, args)
    check_patient_disjoint(table)
    write_splits(table, out)
    _summary(table, loaded, args, out, time.perf_counter() - start, n_read)
    return 0


def _summary(table: pd.DataFrame, loaded: Loaded, args: Any, out: Path, seconds: float, n_read: int) -> None:
    print(f"read {', '.join(loaded.read)}")
    for name in SPLITS:
        part = table[table["split"] == name]
        if len(part):
            print(f"{name:>5}: {len(part):>8,} images {part['patient'].nunique():>8,} patients")
    for reason, count in loaded.skipped_counts.items():
        print(f"skipped {count:,} row(s): {reason} (e.g. {'; '.join(map(str, loaded.skipped[reason]))})")
    for note in loaded.notes:
        print(note)
    print(f"labels ({args.dataset} → NIH 14, shards/datasets/labelmap.csv):")
    known = table[list(LABELS)]
    for line, label in zip(describe(args.dataset), LABELS):
        column = known[label]
        counts = f"1: {int((column == 1).sum()):,}, 0: {int((column == 0).sum()):,}"
        if (column == -1).any():
            counts += f", -1: {int((column == -1).sum()):,}"
        counts += f", unknown: {int(column.isna().sum()):,}"
        print(f"  {line}  [{counts}]")
    print(
        f"split {args.dataset} {args.scheme_used}: {len(table):,} images of {n_read:,} rows read, "
        f"{table['patient'].nunique():,} patients, {sum(loaded.skipped_counts.values()):,} skipped → {out} "
        f"in {seconds:.1f} s"
    )
    sys.stdout.flush()
