"""MIMIC-CXR-JPG 2.0.0 (Johnson et al. 2019): ROOT is the ``mimic-cxr-jpg/2.0.0`` folder.

Files as published (each may be gzipped): ``mimic-cxr-2.0.0-metadata.csv`` (``dicom_id``,
``subject_id``, ``study_id``, ``ViewPosition``, ``StudyDate`` …), ``mimic-cxr-2.0.0-split.csv``
(``dicom_id``, ``study_id``, ``subject_id``, ``split`` = train/validate/test: the official,
patient-level split, used as is), and the labels per STUDY in ``mimic-cxr-2.0.0-chexpert.csv`` or
``-negbio.csv`` (``subject_id``, ``study_id`` and the 14 CheXpert observations: 1, 0, −1, blank).
Images: ROOT/files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg (NN = first two digits of the subject).
Frontal = ViewPosition PA or AP. Images of a study with no row in the label file (the labelers
skipped some reports) are counted and skipped. Sex and age are not in MIMIC-CXR-JPG; with
``--patients`` (MIMIC-IV ``patients.csv``: ``subject_id``, ``gender``, ``anchor_age``,
``anchor_year``) age = anchor_age + (study year − anchor_year), the two sharing one date shift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrbase.errors import CxrError
from shards.datasets.chexpert import FINDINGS
from shards.datasets.common import Loaded, check_official_patient_level, fail_rows, find_file, label_values, read_csv

PREFIX = "mimic-cxr-2.0.0"
FIX = "use the files of MIMIC-CXR-JPG 2.0.0 from PhysioNet, unchanged"
OFFICIAL = {"train": "train", "validate": "val", "test": "test"}


def _ids(path: Path, frame: pd.DataFrame, columns: list[str]) -> None:
    for column in columns:
        value = pd.to_numeric(frame[column], errors="coerce")
        fail_rows(path, frame, value.isna(), f"{column} is not an integer", FIX, column)
        frame[column] = value.astype(np.int64)


def load(root: Path, args: Any) -> Loaded:
    where = "pass --root the mimic-cxr-jpg/2.0.0 folder"
    meta_path = find_file(root, [f"{PREFIX}-metadata.csv"], "MIMIC-CXR-JPG metadata", f"{where}; {FIX}")
    split_path = find_file(root, [f"{PREFIX}-split.csv"], "MIMIC-CXR-JPG split file", f"{where}; {FIX}")
    labeler = getattr(args, "labeler", "chexpert")
    label_path = find_file(root, [f"{PREFIX}-{labeler}.csv"], f"MIMIC-CXR-JPG {labeler} labels", f"{where}; {FIX}")
    meta = read_csv(
        meta_path,
        ["dicom_id", "subject_id", "study_id", "ViewPosition"],
        FIX,
        dtype={"dicom_id": str, "ViewPosition": str},
    )
    _ids(meta_path, meta, ["subject_id", "study_id"])
    split = read_csv(
        split_path, ["dicom_id", "study_id", "subject_id", "split"], FIX, dtype={"dicom_id": str, "split": str}
    )
    fail_rows(
        split_path, split, ~split["split"].isin(list(OFFICIAL)), "split is not train, validate or test", FIX, "split"
    )
    labels = read_csv(label_path, ["subject_id", "study_id", *FINDINGS], FIX)
    _ids(label_path, labels, ["subject_id", "study_id"])
    values = label_values(label_path, labels, FINDINGS, FIX)
    dup = labels.duplicated(["subject_id", "study_id"], keep=False).to_numpy()
    fail_rows(label_path, labels, dup, "study listed twice", FIX, "study_id")

    dup = meta["dicom_id"].duplicated(keep=False).to_numpy()
    fail_rows(meta_path, meta, dup, "dicom_id listed twice", FIX, "dicom_id")
    official = meta["dicom_id"].map(split.drop_duplicates("dicom_id").set_index("dicom_id")["split"])
    fail_rows(meta_path, meta, official.isna(), f"dicom_id not in {split_path.name}", FIX, "dicom_id")

    study_labels = pd.concat([labels[["subject_id", "study_id"]], values], axis=1)
    merged = meta.merge(study_labels, on=["subject_id", "study_id"], how="left", indicator=True)
    subject = merged["subject_id"].astype(str)
    image = (
        "files/p"
        + subject.str[:2]
        + "/p"
        + subject
        + "/s"
        + merged["study_id"].astype(str)
        + "/"
        + merged["dicom_id"]
        + ".jpg"
    )
    view = merged["ViewPosition"]
    age, sex = _demographics(merged, getattr(args, "patients", None))
    frame = pd.DataFrame(
        {
            "image": image,
            "patient": merged["subject_id"].to_numpy(np.int64),
            "age": age,
            "sex": sex,
            "view": view.where(view.isin(["PA", "AP"])),
            "frontal": view.isin(["PA", "AP"]).to_numpy(),
            "official": official.map(OFFICIAL).to_numpy(),
        }
    )
    frame = pd.concat([frame, merged[FINDINGS]], axis=1)
    loaded = Loaded(frame, FINDINGS, official=True, read=[str(meta_path), str(split_path), str(label_path)])
    unlabelled = (merged["_merge"] == "left_only").to_numpy()
    examples = [
        f"{meta_path.name} line {i + 2}: study {merged['study_id'].iloc[i]}" for i in np.flatnonzero(unlabelled)[:3]
    ]
    loaded.skip(f"study has no row in {label_path.name}", examples, unlabelled.sum())
    loaded.frame = frame[~unlabelled].reset_index(drop=True)
    check_official_patient_level(loaded.frame, str(split_path))
    return loaded


def _demographics(merged: pd.DataFrame, patients: str | None) -> tuple[np.ndarray, np.ndarray]:
    n = len(merged)
    if not patients:
        return np.full(n, np.nan), np.full(n, None, dtype=object)
    path = Path(patients)
    if not path.is_file():
        raise CxrError(f"{path}: --patients file not found — pass MIMIC-IV hosp/patients.csv[.gz]")
    table = read_csv(path, ["subject_id", "gender", "anchor_age", "anchor_year"], "pass MIMIC-IV hosp/patients.csv")
    table = table.drop_duplicates("subject_id").set_index("subject_id")
    subject = merged["subject_id"]
    sex = subject.map(table["gender"]).where(lambda s: s.isin(["M", "F"])).to_numpy(dtype=object)
    age = subject.map(table["anchor_age"]).astype(np.float64)
    if "StudyDate" in merged.columns:
        year = pd.to_numeric(merged["StudyDate"], errors="coerce") // 10000
        age = age + (year - subject.map(table["anchor_year"]).astype(np.float64))
    return age.to_numpy(np.float64), sex
