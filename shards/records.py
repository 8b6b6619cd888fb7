"""The non-image members of a sample, built from one row of the splits table.

`.labels` 14 uint8, `.meta` 5 float32 LE (age, sex_M, sex_F, view_PA, view_AP),
`.id` the key NUL-padded to 32 bytes, `.json` the readable record — see
docs/shards-format.md. Also the per-split statistics that go into the manifest.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from shards.errors import CxrError
from shards.labels import LABELS

ID_BYTES = 32
SPLITS = ("train", "val", "test")
SEXES = ("M", "F")
VIEWS = ("PA", "AP")
REQUIRED_COLUMNS = ("image", "patient", "split", *LABELS, "age", "sex", "view")


@dataclass(frozen=True)
class Record:
    """One image's row of the splits table."""

    key: str
    image: str
    patient: int
    split: str
    labels: tuple[int, ...]
    age: float | None
    sex: str | None
    view: str | None


def image_key(image: str) -> str:
    """NIH file name → shard key (``00000001_000.png`` → ``00000001_000``)."""
    return image[:-4] if image.lower().endswith(".png") else image


def id_bytes(key: str) -> bytes:
    """The `.id` member: key as ASCII, NUL-padded to 32 bytes."""
    raw = key.encode("ascii")
    if len(raw) > ID_BYTES:
        raise ValueError(f"key {key!r} is longer than {ID_BYTES} bytes")
    return raw.ljust(ID_BYTES, b"\0")


def labels_bytes(labels: Iterable[int]) -> bytes:
    return bytes(np.asarray(list(labels), dtype=np.uint8))


def meta_vector(age: float | None, sex: str | None, view: str | None) -> np.ndarray:
    """[age (NaN when unknown), sex_M, sex_F, view_PA, view_AP] as float32 (labels.META_FIELDS order)."""
    return np.array([np.nan if age is None else age, sex == "M", sex == "F", view == "PA", view == "AP"],
                    dtype="<f4")


def record_json(rec: Record) -> dict[str, Any]:
    age = None if rec.age is None else (int(rec.age) if float(rec.age).is_integer() else rec.age)
    return {"image": rec.image, "patient": rec.patient, "split": rec.split, "labels": list(rec.labels),
            "findings": [name for name, y in zip(LABELS, rec.labels) if y], "age": age,
            "sex": rec.sex, "view": rec.view}


def sample_members(rec: Record, ext: str, image: bytes) -> list[tuple[str, bytes]]:
    """All five members of one sample, in tar order."""
    return [
        (f"{rec.key}.{ext}", image),
        (f"{rec.key}.labels", labels_bytes(rec.labels)),
        (f"{rec.key}.meta", meta_vector(rec.age, rec.sex, rec.view).tobytes()),
        (f"{rec.key}.id", id_bytes(rec.key)),
        (f"{rec.key}.json", json.dumps(record_json(rec), separators=(",", ":")).encode()),
    ]


def read_splits(splits: Any) -> tuple[list[Record], str | None, str]:
    """Load a splits table (path to .parquet/.csv, or a DataFrame) and validate it.

    Returns (records in table order, file name or None, sha256 of the table).
    """
    import pandas as pd  # only pack needs pandas; verify imports this module too

    if isinstance(splits, pd.DataFrame):
        frame, name = splits.reset_index(drop=True), None
        digest = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()
        where = "splits table"
    else:
        path = Path(splits)
        if not path.is_file():
            raise CxrError(f"{path}: splits table not found — write one with `python -m shards split`")
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        name, digest, where = str(path.resolve()), _file_sha256(path), str(path)
    return _records(frame, where), name, digest


def _file_sha256(path: Path) -> str:
    from shards.pack_journal import file_sha256  # chunked: hashlib.file_digest is Python ≥ 3.11

    return file_sha256(path)


def _records(frame: Any, where: str) -> list[Record]:
    import pandas as pd

    absent = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if absent:
        raise CxrError(f"{where}: missing columns {absent} — write the table with `python -m shards split`")

    def fail(mask: Any, what: str) -> None:
        if mask.any():
            rows = list(frame.index[mask][:5])
            names = list(frame.loc[mask, "image"].astype(str)[:5])
            raise CxrError(f"{where}: {int(mask.sum())} rows with {what} (first rows {rows}: {names}) "
                           "— fix the splits table")

    images = frame["image"].astype(str)
    keys = images.map(image_key)
    fail(keys.duplicated(keep=False), "a duplicate image id")
    fail(keys.map(lambda k: not k.isascii() or len(k) > ID_BYTES or "/" in k or "." in k),
         f"an image id that is not ASCII, contains '/' or '.', or is longer than {ID_BYTES} bytes")
    fail(~frame["split"].isin(SPLITS), f"a split not in {SPLITS}")
    labels = frame[list(LABELS)].apply(pd.to_numeric, errors="coerce")
    fail(~labels.isin([0, 1]).all(axis=1), "a label value other than 0/1")
    patient = pd.to_numeric(frame["patient"], errors="coerce")
    fail(patient.isna() | (patient != patient.round()), "a patient id that is not an integer")
    age = pd.to_numeric(frame["age"], errors="coerce")
    fail(age.isna() & frame["age"].notna(), "a non-numeric age")
    fail(~(frame["sex"].isin(SEXES) | frame["sex"].isna()), f"a sex not in {SEXES}")
    fail(~(frame["view"].isin(VIEWS) | frame["view"].isna()), f"a view not in {VIEWS}")
    label_rows = labels.astype(int).to_numpy()
    return [
        Record(k, img, int(p), s, tuple(int(v) for v in lab), None if math.isnan(a) else float(a),
               sx if isinstance(sx, str) else None, vw if isinstance(vw, str) else None)
        for k, img, p, s, lab, a, sx, vw in zip(keys, images, patient, frame["split"], label_rows,
                                                 age.astype(float), frame["sex"], frame["view"])
    ]


def split_summary(records: Sequence[Record], shards_per_split: dict[str, int]) -> dict[str, Any]:
    """Per split: samples, patients, shards, positives and prevalence per label."""
    summary = {}
    for split in SPLITS:
        mine = [r for r in records if r.split == split]
        positives = np.sum([r.labels for r in mine], axis=0, dtype=np.int64) if mine else np.zeros(len(LABELS))
        summary[split] = {
            "samples": len(mine),
            "patients": len({r.patient for r in mine}),
            "shards": shards_per_split.get(split, 0),
            "positives": {name: int(n) for name, n in zip(LABELS, positives)},
            "prevalence": {name: (round(float(n) / len(mine), 6) if mine else None)
                           for name, n in zip(LABELS, positives)},
        }
    return summary


def meta_stats(records: Iterable[Record]) -> dict[str, float | None]:
    """Mean and population std (ddof 0) of age over the train split's known ages."""
    ages = np.array([r.age for r in records if r.split == "train" and r.age is not None], dtype=np.float64)
    if ages.size == 0:
        return {"age_mean": None, "age_std": None}
    return {"age_mean": round(float(ages.mean()), 6), "age_std": round(float(ages.std()), 6)}

