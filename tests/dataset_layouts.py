"""Tiny copies of public chest X-ray data sets in their published layouts (CheXpert, MIMIC-CXR-JPG,
PadChest, VinDr-CXR): the documented CSV headers, a few rows, 32×32 images. tests/test_datasets.py
checks the adapters against hand-written expectations for these rows; the README's "Other data
sets" walkthrough makes its folders with ``python tests/dataset_layouts.py OUT``.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CHEXPERT_FINDINGS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]  # fmt: skip


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _finding_row(values: dict[str, str]) -> list[str]:
    return [values.get(name, "") for name in CHEXPERT_FINDINGS]


# CheXpert: (path under CheXpert-v1.0/, sex, age, frontal/lateral, AP/PA, {finding: value as written})
CHEXPERT_TRAIN = [
    ("train/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP", {"No Finding": "1.0", "Support Devices": "1.0"}),
    ("train/patient00002/study2/view1_frontal.jpg", "Female", 87, "Frontal", "AP", {"Cardiomegaly": "-1.0", "Pleural Effusion": "1.0", "Lung Lesion": "1.0"}),
    ("train/patient00002/study1/view1_frontal.jpg", "Female", 83, "Frontal", "AP", {"Pleural Effusion": "0.0", "Edema": "-1.0"}),
    ("train/patient00002/study1/view2_lateral.jpg", "Female", 83, "Lateral", "", {"Pleural Effusion": "0.0", "Edema": "-1.0"}),
    ("train/patient00003/study1/view1_frontal.jpg", "Male", 41, "Frontal", "PA", {"Atelectasis": "1.0", "Pneumothorax": "0.0", "Consolidation": "-1.0"}),
    ("train/patient00004/study1/view1_frontal.jpg", "Unknown", 20, "Frontal", "PA", {"Pneumonia": "1.0", "Pleural Effusion": "-1.0"}),
    ("train/patient00005/study1/view1_frontal.jpg", "Male", 33, "Frontal", "PA", {"No Finding": "1.0"}),
    ("train/patient00006/study1/view1_frontal.jpg", "Female", 71, "Frontal", "AP", {"Edema": "1.0", "Cardiomegaly": "1.0"}),
    ("train/patient00007/study1/view1_frontal.jpg", "Male", 58, "Frontal", "AP", {"Pneumothorax": "1.0"}),
    ("train/patient00008/study1/view1_frontal.jpg", "Female", 62, "Frontal", "PA", {"Atelectasis": "0.0"}),
]  # fmt: skip
CHEXPERT_VALID = [
    ("valid/patient64541/study1/view1_frontal.jpg", "Male", 73, "Frontal", "AP", {"Cardiomegaly": "1.0", "Edema": "0.0", "Pleural Effusion": "0.0", "Atelectasis": "0.0", "Consolidation": "0.0", "Pneumonia": "0.0", "Pneumothorax": "0.0", "Lung Lesion": "0.0"}),
    ("valid/patient64542/study1/view1_frontal.jpg", "Male", 70, "Frontal", "PA", {"Cardiomegaly": "0.0", "Edema": "0.0", "Pleural Effusion": "1.0", "Atelectasis": "1.0", "Consolidation": "0.0", "Pneumonia": "0.0", "Pneumothorax": "0.0", "Lung Lesion": "0.0"}),
    ("valid/patient64542/study1/view2_lateral.jpg", "Male", 70, "Lateral", "", {"Cardiomegaly": "0.0"}),
]  # fmt: skip


def write_chexpert(root: Path, top: str = "CheXpert-v1.0") -> Path:
    """ROOT/CheXpert-v1.0/{train,valid}.csv + JPEGs; returns the CheXpert-v1.0 folder."""
    base = root / top
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
    for name, rows in (("train.csv", CHEXPERT_TRAIN), ("valid.csv", CHEXPERT_VALID)):
        _write_csv(base / name, header, [[f"{top}/{p}", s, a, fl, v, *_finding_row(f)] for p, s, a, fl, v, f in rows])
    for i, (path, *_rest) in enumerate(CHEXPERT_TRAIN + CHEXPERT_VALID):
        (base / path).parent.mkdir(parents=True, exist_ok=True)
        (base / path).write_bytes(jpeg_bytes(i))
    return base


# MIMIC-CXR-JPG: (dicom_id, subject, study, ViewPosition, official split); labels per study below
MIMIC_IMAGES = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", 10000032, 50414267, "PA", "train"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", 10000032, 50414267, "LATERAL", "train"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", 10000032, 53189527, "AP", "train"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", 10000764, 57375967, "AP", "train"),
    ("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", 10000898, 50771383, "PA", "train"),
    ("9a5c1a95-25d4bd1b-6b8d6ad6-3c8a4a3d-0c9e5f01", 10001122, 51234567, "PA", "validate"),
    ("b1c3e9d2-9f1e0a44-5a3f7d21-77e0c3b5-aa51e0c2", 10001176, 52222222, "AP", "test"),
    ("c7e81d0a-63b4f2a1-0e4d9c77-1f2a3b4c-5d6e7f80", 10001176, 53333333, "AP", "test"),
    ("d9f0a1b2-c3d4e5f6-a7b8c9d0-e1f2a3b4-c5d6e7f8", 10002013, 54444444, "PA", "train"),  # study without labels
]  # fmt: skip
MIMIC_LABELS = [
    (10000032, 50414267, {"No Finding": "1.0"}),
    (10000032, 53189527, {"Pleural Effusion": "-1.0", "Lung Lesion": "1.0", "Atelectasis": "0.0"}),
    (10000764, 57375967, {"Consolidation": "1.0", "Pneumonia": "-1.0"}),
    (10000898, 50771383, {"Cardiomegaly": "1.0", "Edema": "1.0", "Pleural Effusion": "0.0"}),
    (10001122, 51234567, {"Pneumothorax": "1.0"}),
    (10001176, 52222222, {"Atelectasis": "1.0", "Pleural Effusion": "1.0"}),
    (10001176, 53333333, {"No Finding": "1.0"}),
]  # fmt: skip


def mimic_path(dicom_id: str, subject: int, study: int) -> str:
    return f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id}.jpg"


def write_mimic(root: Path) -> Path:
    """ROOT/mimic-cxr-jpg/2.0.0/{metadata,split,chexpert}.csv(.gz for metadata) + JPEGs; returns the 2.0.0 folder."""
    import gzip

    base = root / "mimic-cxr-jpg" / "2.0.0"
    base.mkdir(parents=True, exist_ok=True)
    meta_header = [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
        "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]  # fmt: skip
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(meta_header)
    for d, subject, study, view, _ in MIMIC_IMAGES:
        writer.writerow([d, subject, study, "CHEST (PA AND LAT)", view, 32, 32, 21800506, 213014.531, "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
    (base / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode(), mtime=0))
    _write_csv(base / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], [[d, st, su, sp] for d, su, st, _, sp in MIMIC_IMAGES])
    _write_csv(
        base / "mimic-cxr-2.0.0-chexpert.csv",
        ["subject_id", "study_id", *CHEXPERT_FINDINGS],
        [[su, st, *_finding_row(f)] for su, st, f in MIMIC_LABELS],
    )
    for i, (d, subject, study, _, _) in enumerate(MIMIC_IMAGES):
        path = base / mimic_path(d, subject, study)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(100 + i))
    return base


def write_all(out: Path) -> dict[str, Path]:
    """Every layout under OUT; returns data set → the --root to pass."""
    return {"chexpert": write_chexpert(out / "chexpert"), "mimic": write_mimic(out / "mimic")}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/dataset_layouts.py OUT")
    for name, root in write_all(Path(sys.argv[1])).items():
        print(f"{name}: --root {root}")
