"""CheXpert (Irvin et al. 2019): ROOT/train.csv and ROOT/valid.csv, images under ROOT/{train,valid}/.

ROOT is the unpacked ``CheXpert-v1.0`` (or ``CheXpert-v1.0-small``) folder. Columns as published:
``Path`` (``CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg``), ``Sex``, ``Age``,
``Frontal/Lateral``, ``AP/PA`` and the 14 observations (1 positive, 0 negative, −1 uncertain,
blank not mentioned = unknown). The patient is the number in ``patientNNNNN`` of the path; image
paths are kept relative to ROOT (the leading ``CheXpert-v1.0*/`` dropped). Official split:
train.csv → train (val carved from its patients by --val-fraction), valid.csv (the radiologist-
labelled hold-out, patients 64541–64740) → test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shards.datasets.common import Loaded, fail_rows, find_file, label_values, read_csv

FINDINGS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS]
PATH = r"^(?:CheXpert-v1\.0[^/]*/)?((?:train|valid|test)/patient(\d+)/study\d+/view\d+_(?:frontal|lateral)\.jpg)$"
SEX = {"Male": "M", "Female": "F"}
FIX = "use train.csv/valid.csv as downloaded from Stanford AIMI (CheXpert-v1.0)"


def read_one(path: Path, official: str) -> pd.DataFrame:
    raw = read_csv(path, COLUMNS, FIX, dtype={"Path": str, "Sex": str, "Frontal/Lateral": str, "AP/PA": str})
    parts = raw["Path"].str.extract(PATH)
    fail_rows(
        path,
        raw,
        parts[0].isna(),
        "Path is not CheXpert-v1.0/{train,valid}/patientN/studyN/viewN_{frontal,lateral}.jpg",
        FIX,
        "Path",
    )
    side = raw["Frontal/Lateral"]
    fail_rows(
        path,
        raw,
        ~side.isin(["Frontal", "Lateral"]),
        "Frontal/Lateral is not Frontal or Lateral",
        FIX,
        "Frontal/Lateral",
    )
    age = pd.to_numeric(raw["Age"], errors="coerce")
    fail_rows(path, raw, age.isna() & raw["Age"].notna(), "Age is not a number", FIX, "Age")
    frame = pd.DataFrame(
        {
            "image": parts[0],
            "patient": parts[1].astype(np.int64),
            "age": age.astype(np.float64),
            "sex": raw["Sex"].map(SEX),
            "view": raw["AP/PA"].where(raw["AP/PA"].isin(["PA", "AP"])),
            "frontal": (side == "Frontal").to_numpy(),
            "official": official,
        }
    )
    return pd.concat([frame, label_values(path, raw, FINDINGS, FIX)], axis=1)


def load(root: Path, args: Any) -> Loaded:
    train = find_file(root, ["train.csv"], "CheXpert train.csv", f"pass --root the CheXpert-v1.0 folder; {FIX}")
    valid = find_file(root, ["valid.csv"], "CheXpert valid.csv", f"pass --root the CheXpert-v1.0 folder; {FIX}")
    frame = pd.concat([read_one(train, "train"), read_one(valid, "test")], ignore_index=True)
    from shards.datasets.common import check_official_patient_level

    check_official_patient_level(frame, f"{train} and {valid}")
    return Loaded(frame, FINDINGS, official=True, read=[str(train), str(valid)])
