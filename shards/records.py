"""The non-image members of a sample, built from one row of the splits table.

`.labels` one uint8 per label (1, 0, or UNKNOWN = 255 for a masked entry), `.meta` 5 float32 LE (age, sex_M, sex_F, view_PA, view_AP),
`.id` the key NUL-padded to 32 bytes, `.json` the readable record — see
docs/shards-format.md. Also the per-split statistics that go into the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cxrbase.errors import CxrError
from cxrbase.labels import (
    LABELS,
    TABLE_FIELDS,
    UNCERTAIN,
    UNCERTAIN_POLICIES,
    UNKNOWN,
    missing_nih_labels,
    table_labels,
)

ID_BYTES = 32
SPLITS = ("train", "val", "test")
SEXES = ("M", "F")
VIEWS = ("PA", "AP")


@dataclass(frozen=True)
class Record:
    """One image's row of the splits table."""

    key: str
    image: str
    patient: int
    split: str
    labels: tuple[int, ...]  # 1, 0, UNCERTAIN (-1, before pack's policy) or UNKNOWN (255)
    age: float | None
    sex: str | None
    view: str | None
    names: tuple[str, ...] = LABELS  # the table's label names (the 14 NIH ones, or a generic table's)


IMAGE_SUFFIXES = (".png", ".dcm", ".dicom")  # what a table's image name may end with; the key drops it


def image_key(image: str) -> str:
    """Image file name → shard key (``00000001_000.png`` → ``00000001_000``; ``a.dcm`` → ``a``)."""
    for suffix in IMAGE_SUFFIXES:
        if image.lower().endswith(suffix):
            return image[: -len(suffix)]
    return image


def id_bytes(key: str) -> bytes:
    """The `.id` member: key as ASCII, NUL-padded to 32 bytes."""
    raw = key.encode("ascii")
    if len(raw) > ID_BYTES:
        raise ValueError(f"key {key!r} is longer than {ID_BYTES} bytes")
    return raw.ljust(ID_BYTES, b"\0")


def labels_bytes(labels: Iterable[int | None]) -> bytes:
    """The `.labels` member: one uint8 per label, 1/0 or UNKNOWN (255; also for a None, the .json's
    unknown). An uncertain -1 must have been resolved by :func:`resolve_uncertain` first."""
    values = [UNKNOWN if y is None else int(y) for y in labels]
    if any(y not in (0, 1, UNKNOWN) for y in values):
        raise ValueError(f"labels {values}: only 0, 1 or {UNKNOWN} (unknown) go into .labels")
    return bytes(values)


def table_label_values(frame: Any, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A table's label columns → (int16 [N, L] of 1/0/UNCERTAIN/UNKNOWN, bool [N] rows with a value
    that is none of 1, 0, -1 or missing). Missing (NaN/None, an empty CSV cell) is UNKNOWN."""
    import pandas as pd

    raw = frame[list(names)]
    numeric = raw.apply(pd.to_numeric, errors="coerce")
    missing = raw.isna().to_numpy()
    for c, name in enumerate(names):  # text columns: a blank cell is missing too
        if raw[name].dtype == object:
            missing[:, c] |= raw[name].map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(dtype=bool)
    values = numeric.to_numpy(dtype=np.float64)
    bad = (~missing & ~np.isin(values, (0.0, 1.0, float(UNCERTAIN)))).any(axis=1)
    out = np.where(missing | bad[:, None], UNKNOWN, np.nan_to_num(values, nan=UNKNOWN)).astype(np.int16)
    return out, bad


def resolve_uncertain(records: Sequence[Record], policy: str) -> list[Record]:
    """Records with every uncertain (-1) label resolved by ``policy``: ``ignore`` → UNKNOWN (masked,
    the CheXpert paper's U-Ignore), ``zeros`` → 0, ``ones`` → 1. Unknown entries stay unknown."""
    if policy not in UNCERTAIN_POLICIES:
        raise CxrError(f"--uncertain {policy!r}: unknown policy — use one of {', '.join(UNCERTAIN_POLICIES)}")
    to = {"ignore": UNKNOWN, "zeros": 0, "ones": 1}[policy]
    return [
        replace(r, labels=tuple(to if y == UNCERTAIN else y for y in r.labels)) if UNCERTAIN in r.labels else r
        for r in records
    ]


def meta_vector(age: float | None, sex: str | None, view: str | None) -> np.ndarray:
    """[age (NaN when unknown), sex_M, sex_F, view_PA, view_AP] as float32 (labels.META_FIELDS order)."""
    return np.array([np.nan if age is None else age, sex == "M", sex == "F", view == "PA", view == "AP"], dtype="<f4")


def record_json(rec: Record) -> dict[str, Any]:
    age = None if rec.age is None else (int(rec.age) if float(rec.age).is_integer() else rec.age)
    return {
        "image": rec.image,
        "patient": rec.patient,
        "split": rec.split,
        "labels": [None if y == UNKNOWN else y for y in rec.labels],  # null: unknown (masked)
        "findings": [name for name, y in zip(rec.names, rec.labels) if y == 1],
        "age": age,
        "sex": rec.sex,
        "view": rec.view,
    }


def sample_members(rec: Record, ext: str, image: bytes) -> list[tuple[str, bytes]]:
    """All five members of one sample, in tar order; the .json carries the others' crc32."""
    members = [
        (f"{rec.key}.{ext}", image),
        (f"{rec.key}.labels", labels_bytes(rec.labels)),
        (f"{rec.key}.meta", meta_vector(rec.age, rec.sex, rec.view).tobytes()),
        (f"{rec.key}.id", id_bytes(rec.key)),
    ]
    record = {**record_json(rec), CRC_FIELD: member_crcs({n.partition(".")[2]: d for n, d in members})}
    return [*members, (f"{rec.key}.json", json_bytes(record))]


# Per-sample content checksums (format cxr-shards/2): the .json holds {ext: crc32} of the
# image, .labels, .meta and .id members. crc32 (zlib, ≈1 ns/byte, GIL released on large
# buffers) catches every single- and double-bit flip and every burst of up to 32 bits in a
# member (up to 512 MB), and any other damage but for a 2^-32 chance, whatever the codec:
# what a reader needs against silent on-disk or copy damage without hashing whole shards.
# It is no defence against tampering (the manifest's per-shard sha256, checked by verify).
CRC_FIELD = "crc32"


def json_bytes(record: dict[str, Any]) -> bytes:
    """The .json member's bytes (compact separators; the same record always gives the same bytes)."""
    return json.dumps(record, separators=(",", ":")).encode()


def member_crcs(members: dict[str, bytes]) -> dict[str, int]:
    """{ext: crc32 of the member's bytes} in the given order."""
    return {ext: zlib.crc32(data) for ext, data in members.items()}


def checksum_problem(expected: Any, members: dict[str, bytes]) -> str | None:
    """None when every given member's crc32 equals the .json's, else the reason (member named).

    ``expected`` is the .json's crc32 field; a member absent from it is a problem, so a
    damaged field cannot switch the check off.
    """
    if not isinstance(expected, dict):
        return f".json has no {CRC_FIELD} checksums (damaged .json)"
    for ext, data in members.items():
        want = expected.get(ext)
        if want is None:
            return f".json has no {CRC_FIELD} for .{ext} (damaged .json)"
        if zlib.crc32(data) != want:
            return f".{ext} checksum mismatch (crc32 {zlib.crc32(data):08x}, packed {int(want):08x}): bytes changed"
    return None


def named_positives(names: Sequence[str], labels: bytes | Sequence[int]) -> list[str]:
    """The names of the positive labels of a ``.labels`` member (or list) under the label names
    ``names``: what the sample's ``.json`` ``findings`` holds when ``names`` is the packed order
    (unknown entries are not positives)."""
    return [name for name, y in zip(names, bytes(labels) if isinstance(labels, bytes) else labels) if y == 1]


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
        try:
            frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except Exception as err:  # pyarrow/pandas raise many types for a corrupt or empty file
            raise CxrError(
                f"{path}: unreadable splits table ({type(err).__name__}: {err}) "
                "— re-write it with `python -m shards split`"
            ) from None
        name, digest, where = str(path.resolve()), _file_sha256(path), str(path)
    records = _records(frame, where)
    check_patients(records, where)
    return records, name, digest


def read_table(path: str | Path) -> Any:
    """Read a splits table (.parquet or .csv) as a DataFrame with its contract dtypes, for
    `shards stats`; CxrError if malformed. (:func:`read_splits` is pack's reader: Records.)"""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{path}: splits table not found — write it with `python -m shards split`")
    try:
        table = (
            pd.read_parquet(path)
            if path.suffix == ".parquet"
            else pd.read_csv(path, dtype={"image": str, "split": str, "sex": str, "view": str})
        )
    except Exception as err:  # pyarrow/pandas raise many types for a corrupt file
        raise CxrError(f"{path}: unreadable splits table ({err}) — re-run `python -m shards split`") from err
    names = table_labels(table.columns)
    missing = [c for c in TABLE_FIELDS if c not in table.columns] + ([] if names else ["a label column"])
    missing += missing_nih_labels(table.columns)
    if missing:
        raise CxrError(f"{path}: missing column(s) {missing} — re-run `python -m shards split`")
    values, bad = table_label_values(table, names)
    if bad.any():
        raise CxrError(
            f"{path}: label columns must be 1, 0, -1 (uncertain) or empty (unknown); row {int(np.argmax(bad))} "
            f"({table['image'].iloc[int(np.argmax(bad))]}) is not — re-run `python -m shards split`"
        )
    # fully known columns keep their uint8 dtype; one with unknown/uncertain entries is float
    # (NaN = unknown, -1 = uncertain), the way pandas reads an empty CSV cell
    for c, name in enumerate(names):
        col = values[:, c]
        table[name] = (
            col.astype(np.uint8)
            if np.isin(col, (0, 1)).all()
            else np.where(col == UNKNOWN, np.nan, col).astype(np.float64)
        )
    return table


def _file_sha256(path: Path) -> str:
    from shards.pack_journal import file_sha256  # chunked: hashlib.file_digest is Python ≥ 3.11

    return file_sha256(path)


def _records(frame: Any, where: str) -> list[Record]:
    import pandas as pd

    names = table_labels(frame.columns)
    absent = [c for c in TABLE_FIELDS if c not in frame.columns] + ([] if names else ["a label column"])
    absent += missing_nih_labels(frame.columns)
    if absent:
        raise CxrError(f"{where}: missing columns {absent} — write the table with `python -m shards split`")

    def fail(mask: Any, what: str) -> None:
        if mask.any():
            rows = list(frame.index[mask][:5])
            names = list(frame.loc[mask, "image"].astype(str)[:5])
            raise CxrError(
                f"{where}: {int(mask.sum())} rows with {what} (first rows {rows}: {names}) — fix the splits table"
            )

    images = frame["image"].astype(str)
    keys = images.map(image_key)
    fail(keys.duplicated(keep=False), "a duplicate image id")
    fail(
        keys.map(lambda k: not k.isascii() or len(k) > ID_BYTES or "/" in k or "." in k),
        f"an image id that is not ASCII, contains '/' or '.', or is longer than {ID_BYTES} bytes",
    )
    fail(~frame["split"].isin(SPLITS), f"a split not in {SPLITS}")
    label_rows, bad_labels = table_label_values(frame, names)
    fail(bad_labels, "a label value other than 1, 0, -1 (uncertain) or empty (unknown)")
    patient = pd.to_numeric(frame["patient"], errors="coerce")
    fail(patient.isna() | (patient != patient.round()), "a patient id that is not an integer")
    age = pd.to_numeric(frame["age"], errors="coerce")
    fail(age.isna() & frame["age"].notna(), "a non-numeric age")
    fail(~(frame["sex"].isin(SEXES) | frame["sex"].isna()), f"a sex not in {SEXES}")
    fail(~(frame["view"].isin(VIEWS) | frame["view"].isna()), f"a view not in {VIEWS}")
    return [
        Record(
            k,
            img,
            int(p),
            s,
            tuple(int(v) for v in lab),
            None if math.isnan(a) else float(a),
            sx if isinstance(sx, str) else None,
            vw if isinstance(vw, str) else None,
            tuple(names),
        )
        for k, img, p, s, lab, a, sx, vw in zip(
            keys, images, patient, frame["split"], label_rows, age.astype(float), frame["sex"], frame["view"]
        )
    ]


NIH_NAME = r"\d{8}_\d{3}"  # NIH image ids: PATIENT(8 digits)_FOLLOWUP(3 digits)


def nih_name_patient(keys: Any) -> Any:
    """Patient id an NIH-style key implies (``00000075_002`` → 75), NaN for other names.

    keys: a pandas Series of image keys (no extension). NIH guarantees this equals the
    Patient ID column; names of another scheme (a generic CSV) are not checked.
    """
    import pandas as pd

    nih = keys.str.fullmatch(NIH_NAME)
    return pd.to_numeric(keys.str[:8].where(nih), errors="coerce")


def patient_leaks(records: Sequence[Record]) -> dict[int, dict[str, list[str]]]:
    """Patients with images in more than one split: patient → {split: [keys]}."""
    by_patient: dict[int, dict[str, list[str]]] = {}
    for rec in records:
        by_patient.setdefault(rec.patient, {}).setdefault(rec.split, []).append(rec.key)
    return {p: splits for p, splits in by_patient.items() if len(splits) > 1}


def describe_leaks(leaks: dict[int, dict[str, list[str]]], limit: int = 3) -> str:
    """'patient 75: train [00000075_000], val [00000075_001]; …' for the first ``limit`` patients."""
    parts = []
    for patient in sorted(leaks)[:limit]:
        where = ", ".join(f"{split} {keys[:5]}" for split, keys in sorted(leaks[patient].items()))
        parts.append(f"patient {patient}: {where}")
    return "; ".join(parts) + (f"; … {len(leaks) - limit} more" if len(leaks) > limit else "")


def check_patients(records: Sequence[Record], where: str) -> None:
    """CxrError if a patient is in two splits (leakage); warn when an NIH name disagrees with its patient."""
    import pandas as pd

    leaks = patient_leaks(records)
    if leaks:
        raise CxrError(
            f"{where}: {len(leaks)} patient(s) have images in more than one split "
            f"({describe_leaks(leaks)}) — every image of a patient must be in one split; "
            "re-split with `python -m shards split`"
        )
    keys = pd.Series([r.key for r in records], dtype=object)
    implied = nih_name_patient(keys)
    patients = pd.Series([r.patient for r in records])
    odd = (implied.notna() & (implied != patients)).to_numpy()
    if odd.any():
        first = [f"{keys[i]} (patient {patients[i]})" for i in np.flatnonzero(odd)[:5]]
        print(
            f"warning: {where}: {int(odd.sum())} NIH-named image(s) whose patient differs from the name's "
            f"first 8 digits, first {first} — NIH names are PATIENT_FOLLOWUP; the split is only "
            "patient-level if the patient column is right",
            file=sys.stderr,
            flush=True,
        )


def split_summary(records: Sequence[Record], shards_per_split: dict[str, int]) -> dict[str, Any]:
    """Per split: samples, patients, shards, and per label positives, known (samples whose label is
    not UNKNOWN) and prevalence = positives / known (None when no sample knows the label).
    Records come after :func:`resolve_uncertain` (no -1 left)."""
    summary = {}
    names = records[0].names if records else LABELS
    for split in SPLITS:
        mine = [r for r in records if r.split == split]
        y = np.array([r.labels for r in mine], dtype=np.int64).reshape(len(mine), len(names))
        positives, known = (y == 1).sum(axis=0), (y != UNKNOWN).sum(axis=0)
        summary[split] = {
            "samples": len(mine),
            "patients": len({r.patient for r in mine}),
            "shards": shards_per_split.get(split, 0),
            "positives": {name: int(n) for name, n in zip(names, positives)},
            "known": {name: int(k) for name, k in zip(names, known)},
            "prevalence": {
                name: (round(float(n) / k, 6) if k else None) for name, n, k in zip(names, positives, known)
            },
        }
    return summary


def meta_stats(records: Iterable[Record]) -> dict[str, float | None]:
    """Mean and population std (ddof 0) of age over the train split's known ages."""
    ages = np.array([r.age for r in records if r.split == "train" and r.age is not None], dtype=np.float64)
    if ages.size == 0:
        return {"age_mean": None, "age_std": None}
    return {"age_mean": round(float(ages.mean()), 6), "age_std": round(float(ages.std()), 6)}
