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
        writer.writerow(
            [
                d,
                subject,
                study,
                "CHEST (PA AND LAT)",
                view,
                32,
                32,
                21800506,
                213014.531,
                "CHEST (PA AND LAT)",
                "postero-anterior",
                "Erect",
            ]
        )
    (base / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode(), mtime=0))
    _write_csv(
        base / "mimic-cxr-2.0.0-split.csv",
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, st, su, sp] for d, su, st, _, sp in MIMIC_IMAGES],
    )
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


# PadChest: (ImageID, ImageDir, PatientID, sex, birth year, StudyDate_DICOM, Projection, Labels as written)
PADCHEST_ROWS = [
    ("20536686640136348236148679891455886468_k6ga29.png", 0, "10000007", "M", "1950", "20150101", "PA", "['normal']"),
    ("20536686640136348236148679891455886468_k6ga30.png", 0, "10000007", "M", "1950", "20150101", "L", "['cardiomegaly']"),
    ("135803415504923515076821959678074435083_fzis7b.png", 0, "136219810812436271786373307389306097112", "F", "1970.0", "20140505", "AP_horizontal", "['pleural effusion', 'cardiomegaly', 'lobar atelectasis']"),
    ("113855343774216031107737439268243531979_3k951l.png", 1, "232387753838738339711526121280969069469", "F", "1980", "20150303", "PA", "['nodule', 'pulmonary mass', 'hiatal hernia']"),
    ("216840111366964012989926673512011074122523403_00-163-058.png", 1, "216840111366964012989926673512011074122523403", "M", "", "20120101", "PA", "['infiltrates', 'apical pleural thickening', 'pulmonary fibrosis', 'emphysema']"),
    ("216840111366964013076187734852011291090445391_00-196-188.png", 1, "216840111366964013076187734852011291090445391", "M", "1960", "20130101", "PA", ""),
    ("p7.png", 1, "p7", "F", "1945", "20160101", "PA", "['pneumonia', 'consolidation']"),
    ("p8.png", 2, "p8", "M", "1955", "20160101", "AP", "['pneumothorax']"),
    ("p9.png", 2, "p9", "F", "1965", "20160101", "PA", "['pulmonary edema', 'cardiomegaly']"),
    ("p10.png", 2, "p10", "M", "1975", "20160101", "PA", "['normal']"),
    ("p11.png", 2, "p11", "F", "1985", "20160101", "PA", "['COPD signs']"),
]  # fmt: skip
PADCHEST_HEADER = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "BitsStored_DICOM",
    "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM", "ReportID", "Report",
    "MethodLabel", "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS",
]  # fmt: skip


def padchest_pixels(seed: int, size: int = 32) -> np.ndarray:
    """16-bit grey with a 12-bit-like used range that differs per image (what min-max windowing is for)."""
    rng = np.random.default_rng(seed)
    low = int(rng.integers(0, 2000))
    return rng.integers(low, low + 3000, (size, size)).astype(np.uint16)


def write_padchest(root: Path) -> Path:
    """ROOT/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv + ROOT/N/*.png (16-bit); returns ROOT."""
    rows = []
    for image, folder, patient, sex, birth, date, projection, labels in PADCHEST_ROWS:
        values = dict(ImageID=image, ImageDir=folder, StudyDate_DICOM=date, StudyID=f"s-{image[:8]}", PatientID=patient,
                      PatientBirth=birth, PatientSex_DICOM=sex, ViewPosition_DICOM="POSTEROANTERIOR", Projection=projection,
                      MethodProjection="Manual review of DICOM fields", Pediatric="No", Modality_DICOM="CR",
                      BitsStored_DICOM=12, WindowCenter_DICOM="", WindowWidth_DICOM="", Rows_DICOM=32, Columns_DICOM=32,
                      ReportID=1, Report="", MethodLabel="Physician", Labels=labels, Localizations="[]",
                      LabelsLocalizationsBySentence="[]", labelCUIS="[]", LocalizationsCUIS="[]")  # fmt: skip
        rows.append([values[h] for h in PADCHEST_HEADER])
    _write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", PADCHEST_HEADER, rows)
    for i, (image, folder, *_rest) in enumerate(PADCHEST_ROWS):
        (root / str(folder)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(padchest_pixels(i)).save(root / str(folder) / image)
    return root


VINDR_FINDINGS = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
]  # fmt: skip
# train: image_id → per radiologist (rad_id, [findings marked]); test: image_id → consensus findings
VINDR_TRAIN = {
    "000434271f63a053c4128a0ba6352c7f": [("R1", ["Atelectasis", "Cardiomegaly"]), ("R2", ["Atelectasis"]), ("R3", ["No finding"])],
    "00053190460d56c53cc3e57321387478": [("R8", ["No finding"]), ("R9", ["No finding"]), ("R10", ["No finding"])],
    "0005e8e3701dfb1dd93d53e2ff537b6e": [("R1", ["Pleural effusion", "Nodule/Mass", "Pulmonary fibrosis"]), ("R4", ["Pleural effusion", "Nodule/Mass"]), ("R5", ["Nodule/Mass"])],
    "0006e0a85696f6bb578e84fafa9a5607": [("R2", ["Pneumothorax", "Infiltration"]), ("R3", ["Pneumothorax", "Infiltration"]), ("R6", ["Pneumothorax"])],
    "0007d316f756b3fa0baea2ff514ce945": [("R1", ["Emphysema"]), ("R2", ["Emphysema", "Edema"]), ("R3", ["Consolidation"])],
}  # fmt: skip
VINDR_TEST = {
    "002a34c58c5b758217ed1f584ccbcfe9": ["Pleural thickening"],
    "004f33259ee4aef671c2b95d54e4be68": ["No finding"],
}
VINDR_BOXES = [  # image_id, rad_id, class_name, x_min, y_min, x_max, y_max
    ("000434271f63a053c4128a0ba6352c7f", "R1", "Atelectasis", 2.0, 3.0, 12.0, 15.0),
    ("000434271f63a053c4128a0ba6352c7f", "R2", "Atelectasis", 4.0, 3.0, 14.0, 13.0),
    ("0005e8e3701dfb1dd93d53e2ff537b6e", "R1", "Nodule/Mass", 3.0, 3.0, 8.0, 8.0),
    ("00053190460d56c53cc3e57321387478", "R8", "No finding", "", "", "", ""),
]
VINDR_HEADERS = {"000434271f63a053c4128a0ba6352c7f": ("M", "045Y"), "00053190460d56c53cc3e57321387478": ("F", "")}


def write_vindr(root: Path) -> Path:
    """ROOT/annotations/{image_labels_train,image_labels_test,annotations_train}.csv + ROOT/{train,test}/*.dicom."""
    from dicom_data import dicom_bytes

    def marks(found: list[str]) -> list[int]:
        return [int(name in found) for name in VINDR_FINDINGS]

    ann = root / "annotations"
    _write_csv(ann / "image_labels_train.csv", ["image_id", "rad_id", *VINDR_FINDINGS],
               [[i, r, *marks(f)] for i, reads in VINDR_TRAIN.items() for r, f in reads])  # fmt: skip
    _write_csv(
        ann / "image_labels_test.csv", ["image_id", *VINDR_FINDINGS], [[i, *marks(f)] for i, f in VINDR_TEST.items()]
    )
    _write_csv(ann / "annotations_train.csv", ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
               [list(b) for b in VINDR_BOXES])  # fmt: skip
    for n, (split, image_id) in enumerate([("train", i) for i in VINDR_TRAIN] + [("test", i) for i in VINDR_TEST]):
        sex, age = VINDR_HEADERS.get(image_id, ("F", "067Y"))
        stored = np.random.default_rng(200 + n).integers(0, 4096, (32, 32))
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / f"{image_id}.dicom").write_bytes(dicom_bytes(stored, PatientSex=sex, PatientAge=age))
    return root


def write_all(out: Path) -> dict[str, Path]:
    """Every layout under OUT; returns data set → the --root to pass."""
    return {
        "chexpert": write_chexpert(out / "chexpert"),
        "mimic": write_mimic(out / "mimic"),
        "padchest": write_padchest(out / "padchest"),
        "vindr": write_vindr(out / "vindr"),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # dicom_data, beside this file
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/dataset_layouts.py OUT")
    for name, root in write_all(Path(sys.argv[1])).items():
        print(f"{name}: --root {root}")
