"""shards.datasets: CheXpert, MIMIC-CXR-JPG, PadChest and VinDr-CXR layouts → splits tables.

Fixtures are written in each data set's published layout (tests/dataset_layouts.py); every
expectation below is written out by hand from those rows and the data sets' documentation.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dataset_layouts import write_chexpert, write_mimic

from shards.cli import main

NA = None
# NIH order, written out: Atelectasis, Cardiomegaly, Consolidation, Edema, Effusion, Emphysema, Fibrosis,
# Hernia, Infiltration, Mass, Nodule, Pleural_Thickening, Pneumonia, Pneumothorax
NIH = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
]  # fmt: skip


def expect(**values) -> list:
    """A 14-label row: NA (unknown) unless given; keys are NIH names."""
    return [values.get(name, NA) for name in NIH]


def split_table(tmp_path: Path, *args: str) -> pd.DataFrame:
    out = tmp_path / "table.csv"
    assert main(["split", *args, "--out", str(out)]) == 0
    return pd.read_csv(out, dtype={"sex": str, "view": str})


def labels_of(table: pd.DataFrame, image: str) -> list:
    row = table.loc[table["image"] == image, NIH]
    assert len(row) == 1, image
    return [None if pd.isna(v) else int(v) for v in row.iloc[0]]


def one_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


CHEXPERT, MIMIC = 10**17, 2 * 10**17  # patient namespaces: docs/datasets.md "patient"


def assert_patient_level(table: pd.DataFrame) -> None:
    assert (table.groupby("patient")["split"].nunique() == 1).all()


# ------------------------------------------------------------------------------------------- CheXpert

CHEXPERT_EXPECTED = {
    # No Finding = 1: every label CheXpert maps is 0; the 7 it lacks stay unknown
    "train/patient00001/study1/view1_frontal.jpg": expect(
        Atelectasis=0, Cardiomegaly=0, Consolidation=0, Edema=0, Effusion=0, Pneumonia=0, Pneumothorax=0
    ),
    # Lung Lesion = 1 is merged Mass/Nodule: neither is set
    "train/patient00002/study2/view1_frontal.jpg": expect(Cardiomegaly=-1, Effusion=1),
    "train/patient00002/study1/view1_frontal.jpg": expect(Effusion=0, Edema=-1),
    "train/patient00003/study1/view1_frontal.jpg": expect(Atelectasis=1, Pneumothorax=0, Consolidation=-1),
    "train/patient00004/study1/view1_frontal.jpg": expect(Pneumonia=1, Effusion=-1),
    "valid/patient64541/study1/view1_frontal.jpg": expect(
        Cardiomegaly=1, Edema=0, Effusion=0, Atelectasis=0, Consolidation=0, Pneumonia=0, Pneumothorax=0
    ),
    "valid/patient64542/study1/view1_frontal.jpg": expect(
        Cardiomegaly=0, Edema=0, Effusion=1, Atelectasis=1, Consolidation=0, Pneumonia=0, Pneumothorax=0
    ),
}


def test_chexpert_labels_row_by_row(tmp_path):
    root = write_chexpert(tmp_path)
    table = split_table(tmp_path, "--dataset", "chexpert", "--root", str(root))
    for image, labels in CHEXPERT_EXPECTED.items():
        assert labels_of(table, image) == labels, image
    assert set(table["dataset"]) == {"chexpert"}
    assert list(table.columns[:3]) == ["image", "patient", "split"]
    row = table.set_index("image").loc["train/patient00004/study1/view1_frontal.jpg"]
    # Sex Unknown → blank
    assert (row["patient"], row["age"], pd.isna(row["sex"]), row["view"]) == (CHEXPERT + 4, 20, True, "PA")
    row = table.set_index("image").loc["train/patient00002/study2/view1_frontal.jpg"]
    assert (row["patient"], row["age"], row["sex"], row["view"]) == (CHEXPERT + 2, 87, "F", "AP")


def test_chexpert_official_split_frontal_and_patients(tmp_path):
    root = write_chexpert(tmp_path)
    table = split_table(tmp_path, "--dataset", "chexpert", "--root", str(root), "--val-fraction", "0.25")
    assert_patient_level(table)
    assert not table["image"].str.contains("lateral").any()  # frontal only by default
    assert len(table) == 11
    # valid.csv is the test split; train.csv's 8 patients give 2 (25 %) to val
    assert set(table.loc[table["split"] == "test", "patient"]) == {CHEXPERT + 64541, CHEXPERT + 64542}
    assert table.loc[table["split"] == "val", "patient"].nunique() == 2
    assert set(table.loc[table["split"] != "test", "image"].str[:6]) == {"train/"}
    everything = split_table(tmp_path, "--dataset", "chexpert", "--root", str(root), "--all-views")
    lateral = everything.set_index("image").loc["train/patient00002/study1/view2_lateral.jpg"]
    assert len(everything) == 13 and pd.isna(lateral["view"])
    assert labels_of(everything, "train/patient00002/study1/view2_lateral.jpg") == expect(Effusion=0, Edema=-1)


def test_chexpert_small_layout_and_random_scheme(tmp_path):
    root = write_chexpert(tmp_path, top="CheXpert-v1.0-small")
    table = split_table(tmp_path, "--dataset", "chexpert", "--root", str(root), "--scheme", "random", "--seed", "3")
    assert_patient_level(table)
    assert set(table["split"]) <= {"train", "val", "test"} and len(table) == 11
    assert table["image"].str.startswith(("train/", "valid/")).all()


def test_chexpert_errors_name_file_line_and_fix(tmp_path, capsys):
    root = write_chexpert(tmp_path)
    args = ["split", "--dataset", "chexpert", "--root", str(root), "--out", str(tmp_path / "t.csv")]
    train = root / "train.csv"
    lines = train.read_text().splitlines()
    lines[3] = lines[3].replace(",-1.0,", ",2.0,", 1)  # line 4: a label value CheXpert does not use
    train.write_text("\n".join(lines) + "\n")
    err = one_error(capsys, args)
    assert f"{train}: line 4" in err and "not 1, 0, -1 or blank" in err and "=2.0" in err
    lines[3] = lines[3].replace(",2.0,", ",-1.0,", 1).replace("patient00002", "patientXX")
    train.write_text("\n".join(lines) + "\n")
    err = one_error(capsys, args)
    assert f"{train}: line 4 Path=" in err and "patientXX" in err
    (root / "valid.csv").unlink()
    err = one_error(capsys, args)
    assert "valid.csv: CheXpert valid.csv not found" in err and "--root" in err
    err = one_error(capsys, ["split", "--dataset", "chexpert", "--root", str(tmp_path / "nope"), "--out", "x.csv"])
    assert "nope: --root is not a folder" in err


# ------------------------------------------------------------------------------------------- MIMIC

MIMIC_EXPECTED = {  # per dicom_id; labels are per study in mimic-cxr-2.0.0-chexpert.csv
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014": ("train", expect(
        Atelectasis=0, Cardiomegaly=0, Consolidation=0, Edema=0, Effusion=0, Pneumonia=0, Pneumothorax=0)),
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab": ("train", expect(Effusion=-1, Atelectasis=0)),
    "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714": ("train", expect(Consolidation=1, Pneumonia=-1)),
    "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4": ("train", expect(Cardiomegaly=1, Edema=1, Effusion=0)),
    "9a5c1a95-25d4bd1b-6b8d6ad6-3c8a4a3d-0c9e5f01": ("val", expect(Pneumothorax=1)),
    "b1c3e9d2-9f1e0a44-5a3f7d21-77e0c3b5-aa51e0c2": ("test", expect(Atelectasis=1, Effusion=1)),
    "c7e81d0a-63b4f2a1-0e4d9c77-1f2a3b4c-5d6e7f80": ("test", expect(
        Atelectasis=0, Cardiomegaly=0, Consolidation=0, Edema=0, Effusion=0, Pneumonia=0, Pneumothorax=0)),
}  # fmt: skip


def test_mimic_labels_official_split_and_skips(tmp_path, capsys):
    root = write_mimic(tmp_path)
    table = split_table(tmp_path, "--dataset", "mimic", "--root", str(root))
    out = capsys.readouterr().out
    assert "skipped 1 row(s): study has no row in mimic-cxr-2.0.0-chexpert.csv" in out  # counted, named
    assert "skipped 1 row(s): not frontal" in out
    assert len(table) == len(MIMIC_EXPECTED)
    assert_patient_level(table)
    by_id = table.assign(dicom=table["image"].str.rsplit("/", n=1).str[-1].str[:-4]).set_index("dicom")
    for dicom, (split, labels) in MIMIC_EXPECTED.items():
        assert by_id.loc[dicom, "split"] == split, dicom
        assert labels_of(table, by_id.loc[dicom, "image"]) == labels, dicom
    image = by_id.loc["68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"]
    assert image["image"] == "files/p10/p10000764/s57375967/68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714.jpg"
    assert (image["patient"], image["view"]) == (MIMIC + 10000764, "AP")
    assert (root / image["image"]).is_file()


def test_mimic_patients_file_gives_sex_and_age(tmp_path):
    root = write_mimic(tmp_path)
    patients = tmp_path / "patients.csv.gz"
    rows = "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n10000764,M,76,2132,2014 - 2016,\n"
    patients.write_bytes(gzip.compress(rows.encode()))
    table = split_table(tmp_path, "--dataset", "mimic", "--root", str(root), "--patients", str(patients))
    row = table[table["patient"] == MIMIC + 10000764].iloc[0]
    assert (row["sex"], row["age"]) == ("M", 76 + (2180 - 2132))  # StudyDate 21800506 in the fixture
    assert table.loc[table["patient"] != MIMIC + 10000764, "age"].isna().all()


def test_mimic_errors(tmp_path, capsys):
    root = write_mimic(tmp_path)
    args = ["split", "--dataset", "mimic", "--root", str(root), "--out", str(tmp_path / "t.csv")]
    split = root / "mimic-cxr-2.0.0-split.csv"
    split.write_text(split.read_text().replace(",validate\n", ",valid\n"))
    err = one_error(capsys, args)
    assert f"{split}: line 7 split='valid': split is not train, validate or test" in err
    split.write_text(split.read_text().replace(",valid\n", ",validate\n").replace(",test\n", ",train\n", 1))
    err = one_error(capsys, args)  # 10001176 now has images in train and test
    assert "1 patient(s) in more than one official split" in err and "10001176" in err
    split.unlink()
    err = one_error(capsys, args)
    assert "mimic-cxr-2.0.0-split.csv: MIMIC-CXR-JPG split file not found" in err


def test_relative_paths_key_by_digest():
    from shards.records import image_key

    path = "train/patient00001/study1/view1_frontal.jpg"
    assert image_key(path) == hashlib.blake2b(path.encode(), digest_size=16).hexdigest()
    assert image_key("train/patient00002/study1/view1_frontal.jpg") != image_key(path)
    assert image_key("00000001_000.png") == "00000001_000" and image_key("a.jpg") == "a"


# ------------------------------------------------------------------------------------------- PadChest

PADCHEST_EXPECTED = {  # every NIH label PadChest maps is known: listed → 1, else 0
    "0/20536686640136348236148679891455886468_k6ga29.png": [0] * 14,  # ['normal']
    "0/135803415504923515076821959678074435083_fzis7b.png": [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "1/113855343774216031107737439268243531979_3k951l.png": [0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0],
    "1/216840111366964012989926673512011074122523403_00-163-058.png": [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0],
    "1/p7.png": [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
    "2/p8.png": [0] * 13 + [1],
    "2/p9.png": [0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "2/p11.png": [0] * 14,  # 'COPD signs' has no NIH label
}
PADCHEST_FRACTIONS = ["--fractions", "0.5,0.25,0.25"]


def test_padchest_labels_demographics_and_skips(tmp_path, capsys):
    from dataset_layouts import write_padchest

    root = write_padchest(tmp_path / "padchest")
    table = split_table(tmp_path, "--dataset", "padchest", "--root", str(root), *PADCHEST_FRACTIONS)
    out = capsys.readouterr().out
    assert "skipped 1 row(s): no Labels" in out and "line 7" in out  # the empty Labels cell, counted
    assert "split padchest stratified" in out  # no official split
    for image, labels in PADCHEST_EXPECTED.items():
        assert labels_of(table, image) == labels, image
    assert_patient_level(table)
    assert set(table["split"]) == {"train", "val", "test"}
    rows = table.set_index("image")
    assert (rows.loc["0/135803415504923515076821959678074435083_fzis7b.png", ["age", "sex", "view"]].tolist()
            == [44.0, "F", "AP"])  # 2014 − 1970; AP_horizontal is AP  # fmt: skip
    assert pd.isna(rows.loc["1/216840111366964012989926673512011074122523403_00-163-058.png", "age"])
    assert "0/20536686640136348236148679891455886468_k6ga30.png" not in rows.index  # lateral (L)
    assert len(set(table["patient"])) == len(table)  # the fixture's patients each have one frontal image


def test_padchest_malformed_labels_cell(tmp_path, capsys):
    from dataset_layouts import write_padchest

    root = write_padchest(tmp_path / "padchest")
    csv_path = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    csv_path.write_text(csv_path.read_text().replace(",['pneumothorax'],", ",pneumothorax,"))
    err = one_error(capsys, ["split", "--dataset", "padchest", "--root", str(root), "--out", str(tmp_path / "t.csv")])
    assert f"{csv_path}: line 9 Labels='pneumothorax': Labels is not a list" in err


# ------------------------------------------------------------------------------------------- VinDr-CXR

VINDR_EXPECTED = {  # majority of three readers; Hernia and the merged Nodule/Mass unknown
    "train/000434271f63a053c4128a0ba6352c7f.dicom": [1, 0, 0, 0, 0, 0, 0, NA, 0, NA, NA, 0, 0, 0],
    "train/00053190460d56c53cc3e57321387478.dicom": [0, 0, 0, 0, 0, 0, 0, NA, 0, NA, NA, 0, 0, 0],
    "train/0005e8e3701dfb1dd93d53e2ff537b6e.dicom": [0, 0, 0, 0, 1, 0, 0, NA, 0, NA, NA, 0, 0, 0],
    "train/0006e0a85696f6bb578e84fafa9a5607.dicom": [0, 0, 0, 0, 0, 0, 0, NA, 1, NA, NA, 0, 0, 1],
    "train/0007d316f756b3fa0baea2ff514ce945.dicom": [0, 0, 0, 0, 0, 1, 0, NA, 0, NA, NA, 0, 0, 0],
    "test/002a34c58c5b758217ed1f584ccbcfe9.dicom": [0, 0, 0, 0, 0, 0, 0, NA, 0, NA, NA, 1, 0, 0],
    "test/004f33259ee4aef671c2b95d54e4be68.dicom": [0, 0, 0, 0, 0, 0, 0, NA, 0, NA, NA, 0, 0, 0],
}


def test_vindr_majority_labels_split_headers_and_boxes(tmp_path):
    from dataset_layouts import write_vindr

    from shards.records import image_key

    root = write_vindr(tmp_path / "vindr")
    boxes = tmp_path / "boxes.csv"
    table = split_table(tmp_path, "--dataset", "vindr", "--root", str(root), "--val-fraction", "0.4",
                        "--boxes-out", str(boxes))  # fmt: skip
    for image, labels in VINDR_EXPECTED.items():
        assert labels_of(table, image) == labels, image
    by_split = table.groupby("split")["image"].apply(set)
    assert by_split["test"] == {i for i in VINDR_EXPECTED if i.startswith("test/")}
    assert len(by_split["val"]) == 2 and len(by_split["train"]) == 3  # 40 % of 5 train images
    rows = table.set_index("image")
    assert rows.loc["train/000434271f63a053c4128a0ba6352c7f.dicom", ["age", "sex", "view"]].tolist() == [
        45.0,
        "M",
        "PA",
    ]
    assert pd.isna(rows.loc["train/00053190460d56c53cc3e57321387478.dicom", "age"])  # empty PatientAge
    from cxr.tools.explain import read_boxes

    read = read_boxes(boxes)
    key = image_key("train/000434271f63a053c4128a0ba6352c7f.dicom")
    assert read.values.tolist() == [
        [key, "Atelectasis", 2.0, 3.0, 10.0, 12.0],
        [key, "Atelectasis", 4.0, 3.0, 10.0, 10.0],
    ]


def test_vindr_bad_value_and_missing_file(tmp_path, capsys):
    from dataset_layouts import write_vindr

    root = write_vindr(tmp_path / "vindr")
    args = ["split", "--dataset", "vindr", "--root", str(root), "--out", str(tmp_path / "t.csv")]
    labels = root / "annotations" / "image_labels_test.csv"
    lines = labels.read_text().splitlines()
    lines[2] = lines[2].replace(",1", ",-1")
    labels.write_text("\n".join(lines) + "\n")
    err = one_error(capsys, args)
    assert f"{labels}: line 3" in err and "label value not 0 or 1" in err
    labels.unlink()
    err = one_error(capsys, args)
    assert "VinDr-CXR image labels (test) not found" in err and "annotations/" in err


# ------------------------------------------------------------------------------------------- pack


def shard_members(folder: Path) -> dict[str, bytes]:
    import tarfile

    members = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    return members


@pytest.mark.integration
def test_pack_padchest_windows_16bit_and_records_mapping(tmp_path):
    import csv
    import io
    import json

    from dataset_layouts import write_padchest
    from PIL import Image

    root = write_padchest(tmp_path / "padchest")
    table = tmp_path / "pc.parquet"
    assert main(["split", "--dataset", "padchest", "--root", str(root), *PADCHEST_FRACTIONS, "--out", str(table)]) == 0
    out = tmp_path / "shards"
    assert main(["pack", "--splits", str(table), "--images", str(root), "--out", str(out), "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["grey16"] == "minmax" and manifest["rejected"] == [] and manifest["missing"] == []
    shipped = Path(__file__).resolve().parents[1] / "shards" / "datasets" / "labelmap.csv"
    with shipped.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["dataset"] == "padchest"]
    assert manifest["label_mapping"]["datasets"] == ["padchest"] and manifest["label_mapping"]["rows"] == rows
    members = shard_members(out)
    image = "1/113855343774216031107737439268243531979_3k951l.png"
    key = hashlib.blake2b(image.encode(), digest_size=16).hexdigest()
    source = np.asarray(Image.open(root / image)).astype(np.float64)
    expected = np.round((source - source.min()) / (source.max() - source.min()) * 255)
    packed = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
    assert packed.dtype == np.uint8 and np.array_equal(packed, expected)
    record = json.loads(members[f"{key}.json"])
    assert record["image"] == image and record["findings"] == ["Hernia", "Mass", "Nodule"]
    assert main(["verify", str(out), "--workers", "1"]) == 0
    from argparse import Namespace

    from cxr.evaluate import _context
    from cxr.evaluation.tables import label_mapping_section

    context = _context(Namespace(shards=str(out), thresholds_from="val", split="test", ensemble="mean-prob",
                                 bootstrap=0, seed=0, alpha=0.05), "runs")  # fmt: skip
    section = "\n".join(label_mapping_section(context["label_mapping"]))
    assert section.startswith("## Label mapping (padchest → NIH 14)")
    for row in rows:  # every shipped row, as a markdown table row
        assert f"| {row['dataset']} | {row['source']} | {row['target']} | {row['relation']} |" in section.replace(
            "  ", " "
        )
    assert label_mapping_section(None) == []
    strict = tmp_path / "strict"
    assert main(["pack", "--splits", str(table), "--images", str(root), "--out", str(strict), "--grey16", "reject",
                 "--workers", "1", "--allow-rejects"]) == 0  # fmt: skip
    reasons = {r["reason"] for r in json.loads((strict / "manifest.json").read_text())["rejected"]}
    assert reasons == {"unsupported PNG: 16-bit grey (only 8-bit is accepted)"}


@pytest.mark.integration
@pytest.mark.parametrize("codec", ["jpeg", "png"])
def test_pack_chexpert_jpegs_with_repeated_file_names(tmp_path, codec):
    """Every study has its view1_frontal.jpg: keys come from the relative path, not the stem; the
    table's unknown and uncertain labels reach .labels as 255 (masked) under --uncertain ignore."""
    import io
    import json

    from PIL import Image

    root = write_chexpert(tmp_path)
    splits = tmp_path / "chexpert.parquet"
    assert main(["split", "--dataset", "chexpert", "--root", str(root), "--out", str(splits)]) == 0
    table = pd.read_parquet(splits)
    out = tmp_path / "shards"
    args = ["pack", "--splits", str(splits), "--images", str(root), "--out", str(out), "--codec", codec]
    assert main([*args, "--workers", "1"]) == 0
    members = shard_members(out)
    assert len([m for m in members if m.endswith(".json")]) == len(table) == 11
    for image in table["image"]:
        key = hashlib.blake2b(image.encode(), digest_size=16).hexdigest()
        source = (root / image).read_bytes()
        if codec == "jpeg":
            assert members[f"{key}.jpg"] == source  # kept byte for byte: no second lossy generation
        else:
            decoded = np.asarray(Image.open(io.BytesIO(source)).convert("L"))
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(members[f"{key}.png"]))), decoded)
        assert json.loads(members[f"{key}.json"])["image"] == image
        if image in CHEXPERT_EXPECTED:  # unknown and uncertain (ignore) → 255
            want = [255 if v in (None, -1) else v for v in CHEXPERT_EXPECTED[image]]
            assert list(members[f"{key}.labels"]) == want, image
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["label_mapping"]["datasets"] == ["chexpert"]
    assert main(["verify", str(out), "--workers", "1"]) == 0
    (root / "train/patient00003/study1/view1_frontal.jpg").unlink()
    assert main([*args[:-2], "--out", str(tmp_path / "again"), "--workers", "1"]) == 2  # missing image: an error


@pytest.mark.integration
def test_pack_vindr_dicoms(tmp_path):
    import json

    from dataset_layouts import write_vindr

    root = write_vindr(tmp_path / "vindr")
    splits = tmp_path / "vindr.csv"
    assert main(["split", "--dataset", "vindr", "--root", str(root), "--out", str(splits)]) == 0
    out = tmp_path / "shards"
    assert main(["pack", "--splits", str(splits), "--images", str(root), "--out", str(out), "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["splits"].values()) == 7 and manifest["rejected"] == []
    assert manifest["label_mapping"]["datasets"] == ["vindr"]  # read from a CSV table's dataset column
    members = shard_members(out)
    for image, labels in VINDR_EXPECTED.items():
        key = hashlib.blake2b(image.encode(), digest_size=16).hexdigest()
        assert list(members[f"{key}.labels"]) == [255 if v is None else v for v in labels], image


def test_docs_list_every_row_of_the_shipped_mapping():
    """docs/datasets.md shows the harmonisation table as shipped (the docs cannot drift from the data)."""
    import csv

    repo = Path(__file__).resolve().parents[1]
    docs = (repo / "docs" / "datasets.md").read_text()
    with (repo / "shards" / "datasets" / "labelmap.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["dataset"] for r in rows} == {"nih", "chexpert", "mimic", "padchest", "vindr"}
    for r in rows:
        assert f"| {r['source']} | {r['target'] or '—'} | {r['relation']} | {r['source_doc']} |" in docs, r
    from shards.datasets.harmonise import mapping_rows

    assert mapping_rows() == rows  # the package reads the same file


def test_harmonise_combines_sources_by_rule():
    """Several findings of one label: any 1 → 1, else any −1 → −1, else any 0 → 0, else unknown."""
    from shards.datasets.harmonise import harmonise

    src = pd.DataFrame(
        {
            "atelectasis": [1.0, 0.0, 0.0, np.nan],
            "lobar atelectasis": [0.0, 1.0, 0.0, np.nan],
            "round atelectasis": [np.nan, np.nan, 0.0, np.nan],
        }
    )
    out = harmonise(src, "padchest")
    assert [None if pd.isna(v) else int(v) for v in out["Atelectasis"]] == [1, 1, 0, None]
    assert out["Effusion"].isna().all()  # its source column is absent here: unknown
    chexpert = pd.DataFrame(
        {"Pleural Effusion": [-1.0, 0.0, np.nan, np.nan], "No Finding": [np.nan, np.nan, 1.0, np.nan]}
    )
    out = harmonise(chexpert, "chexpert")
    assert [None if pd.isna(v) else int(v) for v in out["Effusion"]] == [-1, 0, 0, None]  # No Finding → 0
    assert out["Emphysema"].isna().all()  # CheXpert has no Emphysema, No Finding or not
