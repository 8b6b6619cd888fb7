"""PadChest (Bustos et al. 2020): ROOT holds the labels CSV and the image folders ROOT/N/ (N = ImageDir).

The CSV as published, ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (or .gz; another
name with --root pointing at its folder is found by the ``PADCHEST_chest_x_ray_images_labels_*``
pattern). Columns used: ``ImageID``, ``ImageDir``, ``PatientID``, ``PatientSex_DICOM``,
``PatientBirth`` (year), ``StudyDate_DICOM`` (YYYYMMDD), ``Projection`` and ``Labels`` (a Python
list literal, e.g. ``['pleural effusion', 'cardiomegaly']``; ``['normal']`` for none). A finding is
1 when listed, else 0: PadChest's label lists are complete, so every NIH label it maps is known.
PatientID is not an integer (hashed with :func:`shards.datasets.common.stable_ids`). No official
split: stratified by default. Frontal = Projection PA, AP or AP_horizontal (view AP). Rows whose
Labels cell is empty are counted and skipped. The images are 16-bit PNGs; pack maps each to
8 bits by a min–max rescale (``--grey16 minmax``, shards.image_codec.window_16bit).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrbase.errors import CxrError
from shards.datasets.common import Loaded, fail_rows, read_csv, stable_ids
from shards.datasets.harmonise import mapping_rows

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
COLUMNS = [
    "ImageID",
    "ImageDir",
    "PatientID",
    "PatientSex_DICOM",
    "PatientBirth",
    "StudyDate_DICOM",
    "Projection",
    "Labels",
]
FIX = f"use {CSV_NAME} as downloaded from BIMCV, unchanged"
VIEW = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP"}
_ITEM = re.compile(r"'([^']*)'")


def find_csv(root: Path) -> Path:
    for candidate in (root / CSV_NAME, root / f"{CSV_NAME}.gz"):
        if candidate.is_file():
            return candidate
    found = sorted(root.glob("PADCHEST_chest_x_ray_images_labels_*.csv*"))
    if found:
        return found[0]
    raise CxrError(
        f"{root / CSV_NAME}: PadChest labels CSV not found — pass --root the folder that holds it and the image folders"
    )


def parse_labels(path: Path, raw: pd.DataFrame) -> pd.Series:
    """The Labels cells → lists of stripped names; CxrError on a cell that is not a list literal."""
    text = raw["Labels"].fillna("").astype(str).str.strip()
    bad = ~(text.eq("") | (text.str.startswith("[") & text.str.endswith("]")))
    fail_rows(path, raw, bad, "Labels is not a list like ['pleural effusion', 'cardiomegaly']", FIX, "Labels")
    return text.map(lambda cell: [name.strip() for name in _ITEM.findall(cell)])


def load(root: Path, args: Any) -> Loaded:
    path = find_csv(root)
    raw = read_csv(
        path,
        COLUMNS,
        FIX,
        dtype={"ImageID": str, "PatientID": str, "Projection": str, "Labels": str, "PatientSex_DICOM": str},
        low_memory=False,
    )
    fail_rows(
        path, raw, raw["ImageID"].isna() | raw["PatientID"].isna(), "ImageID or PatientID is empty", FIX, "ImageID"
    )
    folder = pd.to_numeric(raw["ImageDir"], errors="coerce")
    fail_rows(path, raw, folder.isna(), "ImageDir is not a folder number", FIX, "ImageDir")
    names = parse_labels(path, raw)
    sources = [r["source"] for r in mapping_rows("padchest") if r["relation"] in ("same", "renamed")]
    exploded = names.explode()
    findings = pd.DataFrame(0.0, index=raw.index, columns=sources)
    for source in sources:
        findings.loc[exploded.index[exploded.to_numpy() == source].unique(), source] = 1.0
    birth = pd.to_numeric(raw["PatientBirth"], errors="coerce")
    year = pd.to_numeric(raw["StudyDate_DICOM"], errors="coerce") // 10000
    projection = raw["Projection"].fillna("")
    frame = pd.DataFrame(
        {
            "image": folder.astype("Int64").astype(str) + "/" + raw["ImageID"],
            "patient": stable_ids(raw["PatientID"].tolist()),
            "age": (year - birth).astype(np.float64),
            "sex": raw["PatientSex_DICOM"].where(raw["PatientSex_DICOM"].isin(["M", "F"])),
            "view": projection.map(VIEW),
            "frontal": projection.isin(list(VIEW)).to_numpy(),
            "official": None,
        }
    )
    frame = pd.concat([frame, findings], axis=1)
    loaded = Loaded(frame, sources, official=False, read=[str(path)])
    empty = (names.map(len) == 0).to_numpy()
    examples = [f"{path.name} line {i + 2}: {raw['ImageID'].iloc[i]}" for i in np.flatnonzero(empty)[:3]]
    loaded.skip("no Labels", examples, empty.sum())
    loaded.frame = frame[~empty].reset_index(drop=True)
    return loaded
