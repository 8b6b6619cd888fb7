"""`python -m shards split` and the metadata reader, against the real NIH CSV and hand-made CSVs.

References are independent of the code under test: the raw CSV and list files read
with plain csv/gzip, the NIH facts of SPEC.md, and labels.csv of the real sample.
"""

from __future__ import annotations

import csv
import gzip
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrbase.errors import CxrError
from shards.cli import main
from shards.metadata import read_image_inventory, read_metadata
from shards.splits import check_patient_disjoint, random_assign

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

# SPEC.md canonical order, written out here rather than imported.
SPEC_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
]
CONTRACT_COLUMNS = ["image", "patient", "split", *SPEC_LABELS, "age", "sex", "view"]
# Stratified (greedy) tolerance on the real CSV, 90/5/5, seed 0: measured 0.009 pp mean and
# 0.018 pp max spread, vs ≈0.71 pp mean for a random patient split.
STRAT_MEAN_TOL_PP = 0.02
STRAT_MAX_TOL_PP = 0.05


def _read_gz_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt") as fh:
        return [line.strip() for line in fh if line.strip()]


@pytest.fixture(scope="session")
def raw_rows(nih_dir: Path) -> list[dict]:
    """The real metadata parsed with the csv module only."""
    with gzip.open(nih_dir / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def real_splits(nih_dir: Path, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """Each scheme run once through the CLI on the full CSV; tables read back with plain pandas."""
    out = tmp_path_factory.mktemp("real_splits")
    meta = str(nih_dir / "Data_Entry_2017_v2020.csv.gz")
    runs = {
        "official": [],
        "stratified": [],
        "random": [],
        "random_905": ["--scheme", "random", "--fractions", "0.9,0.05,0.05"],
        "iterstrat": ["--scheme", "stratified", "--method", "iterstrat"],
    }
    tables = {}
    for name, extra in runs.items():
        scheme = extra or ["--scheme", name]
        path = out / f"{name}.parquet"
        assert main(["split", "--metadata", meta, *scheme, "--out", str(path)]) == 0
        tables[name] = pd.read_parquet(path)
    return tables


def _spread_pp(table: pd.DataFrame) -> pd.Series:
    prevalence = table.groupby("split")[SPEC_LABELS].mean() * 100
    return prevalence.max() - prevalence.min()


def test_official_matches_nih_lists(real_splits, nih_dir):
    table = real_splits["official"]
    test = table[table["split"] == "test"]
    assert len(test) == 25_596
    assert test["patient"].nunique() == 2_797
    assert (table["split"] != "test").sum() == 86_524
    assert set(test["image"]) == set(_read_gz_lines(nih_dir / "test_list.txt.gz"))
    tv_patients = table.loc[table["split"] != "test", "patient"].nunique()
    val_patients = table.loc[table["split"] == "val", "patient"].nunique()
    assert val_patients == round(0.1 * tv_patients)


@pytest.mark.parametrize("name", ["official", "stratified", "random", "random_905", "iterstrat"])
def test_no_patient_in_two_splits(real_splits, raw_rows, name):
    table = real_splits[name]
    assert list(table.columns) == CONTRACT_COLUMNS
    assert len(table) == len(raw_rows) == 112_120
    assert table["image"].is_unique
    assert (table.groupby("patient")["split"].nunique() == 1).all()
    assert set(table["split"]) == {"train", "val", "test"}


def test_labels_equal_raw_substring_count(real_splits, raw_rows):
    table = real_splits["official"]
    # no label name is a substring of another, so substring membership is an exact reference
    assert not any(a != b and a in b for a in SPEC_LABELS for b in SPEC_LABELS)
    raw = {r["Image Index"]: r["Finding Labels"] for r in raw_rows}
    findings = table["image"].map(raw)
    for label in SPEC_LABELS:
        expected = sum(label in r["Finding Labels"] for r in raw_rows)
        assert int(table[label].sum()) == expected, label
        assert (table[label].to_numpy() == findings.str.contains(label, regex=False).to_numpy()).all()
    assert table[SPEC_LABELS].dtypes.eq(np.uint8).all()
    no_finding = (table[SPEC_LABELS].sum(axis=1) == 0).to_numpy()
    assert (no_finding == (findings == "No Finding").to_numpy()).all()
    assert no_finding.sum() == 60_361  # NIH v2020 "No Finding" rows


def test_demographics_copied(real_splits, raw_rows):
    table = real_splits["random"].set_index("image")
    for row in raw_rows[::997]:
        got = table.loc[row["Image Index"]]
        assert (got["patient"], got["age"], got["sex"], got["view"]) == (
            int(row["Patient ID"]),
            int(row["Patient Age"]),
            row["Patient Gender"],
            row["View Position"],
        )


def test_stratified_spread_within_tolerance(real_splits):
    strat, rand = _spread_pp(real_splits["stratified"]), _spread_pp(real_splits["random_905"])
    assert strat.mean() <= STRAT_MEAN_TOL_PP, strat.to_dict()
    assert strat.max() <= STRAT_MAX_TOL_PP, strat.to_dict()
    assert strat.mean() < rand.mean() / 10
    share = real_splits["stratified"]["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.9, abs=0.005)
    assert share["val"] == pytest.approx(0.05, abs=0.005)
    assert share["test"] == pytest.approx(0.05, abs=0.005)


def test_iterstrat_method_beats_random_but_not_greedy(real_splits):
    it = _spread_pp(real_splits["iterstrat"]).mean()
    assert _spread_pp(real_splits["stratified"]).mean() < it < _spread_pp(real_splits["random_905"]).mean()


def test_random_is_seeded_patient_fractions(real_splits):
    table = real_splits["random"]
    share = table.groupby("split")["patient"].nunique() / table["patient"].nunique()
    assert share.to_dict() == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2}, abs=1e-4)
    fractions = np.array([0.7, 0.1, 0.2])
    first = random_assign(30_805, fractions, seed=0)
    assert (random_assign(30_805, fractions, seed=0) == first).all()
    assert (random_assign(30_805, fractions, seed=1) != first).mean() > 0.3
    assert np.bincount(random_assign(3, np.array([0.5, 0.25, 0.25]), 0)).tolist() == [1, 1, 1]


def test_restrict_to_sample_follows_official_lists(nih_sample_dir, nih_dir, tmp_path):
    with open(nih_sample_dir / "labels.csv", newline="") as fh:
        official = {r["Image Index"]: r["official_split"] for r in csv.DictReader(fh)}
    out = tmp_path / "sample.csv"
    assert (
        main(
            [
                "split",
                "--metadata",
                str(nih_dir / "Data_Entry_2017_v2020.csv.gz"),
                "--scheme",
                "official",
                "--restrict-to",
                str(nih_sample_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = pd.read_csv(out)
    assert len(table) == len(official) == 130
    for image, split in zip(table["image"], table["split"]):
        assert (split == "test") == (official[image] == "test"), image


def test_inventory_from_list_and_archive(nih_sample_dir, tmp_path):
    names = sorted(p.name for p in nih_sample_dir.glob("*.png"))[:3]
    archive = tmp_path / "images_001.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in names[:2]:
            tar.add(nih_sample_dir / name, arcname=f"images/{name}")
    listing = tmp_path / "list.txt"
    listing.write_text(names[2].removesuffix(".png") + "\n\n")
    assert read_image_inventory([archive, listing]) == set(names)
    folder = tmp_path / "nested" / "images"
    folder.mkdir(parents=True)
    shutil.copy(nih_sample_dir / names[0], folder / names[0])
    assert read_image_inventory([tmp_path / "nested"]) == {names[0]}


# ---------------------------------------------------------------- hand-made CSVs

HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000002_000.png,No Finding,0,2,81,F,AP,2500,2048,0.171,0.171",
    "00000003_000.png,Hernia|Pleural_Thickening,0,3,074Y,F,PA,2500,2048,0.168,0.168",
]


def _write_csv(path: Path, rows: list[str], header: str = HEADER_2017) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_both_sex_headers_give_the_same_table(tmp_path):
    a = read_metadata(_write_csv(tmp_path / "a.csv", ROWS))
    b = read_metadata(_write_csv(tmp_path / "b.csv", ROWS, HEADER_2017.replace("Patient Gender", "Patient Sex")))
    pd.testing.assert_frame_equal(a, b)
    assert a["sex"].tolist() == ["M", "M", "F", "F"]
    assert a["age"].tolist() == [57, 58, 81, 74]
    assert a[SPEC_LABELS].to_numpy().sum(axis=1).tolist() == [1, 2, 0, 2]
    assert a.loc[3, "Hernia"] == 1 and a.loc[3, "Pleural_Thickening"] == 1


@pytest.mark.parametrize(
    "findings, message",
    [
        ("Cardiomegally", "unknown label 'Cardiomegally'"),
        ("Infiltrate", "unknown label 'Infiltrate'"),
        ("Mass|No Finding", "combined"),
        ("Mass|", "unknown label ''"),
        ("mass", "unknown label 'mass'"),
    ],
)
def test_bad_label_names_the_row(tmp_path, findings, message):
    rows = list(ROWS)
    rows[2] = rows[2].replace("No Finding", findings)
    with pytest.raises(CxrError) as err:
        read_metadata(_write_csv(tmp_path / "bad.csv", rows))
    assert "line 4" in str(err.value) and "00000002_000.png" in str(err.value)
    assert message in str(err.value)


def test_bad_label_cli_prints_one_line(tmp_path, capsys):
    rows = [ROWS[0], ROWS[1].replace("Emphysema", "Emphysem")]
    path = _write_csv(tmp_path / "bad.csv", rows)
    assert main(["split", "--metadata", str(path), "--scheme", "random", "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 3" in err and "00000001_001.png" in err
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    "row, message",
    [
        ("00000001_000.png,Mass,0,4,40,M,PA,1,1,1,1", "appears on lines [2, 6]"),
        ("00000009_000.png,Mass,0,9,40,X,PA,1,1,1,1", "line 6"),
        ("00000009_000.png,Mass,0,9,40,M,LL,1,1,1,1", "View Position"),
        ("00000009_000.png,Mass,0,nine,40,M,PA,1,1,1,1", "Patient ID"),
        ("00000009_000.png,Mass,0,9,forty,M,PA,1,1,1,1", "Patient Age"),
    ],
)
def test_bad_rows_are_errors(tmp_path, row, message):
    with pytest.raises(CxrError, match=None) as err:
        read_metadata(_write_csv(tmp_path / "bad.csv", [*ROWS, row]))
    assert message in str(err.value)


def test_missing_column_is_an_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n")
    with pytest.raises(CxrError, match="missing column"):
        read_metadata(path)


def test_patient_across_lists_is_refused(tmp_path, capsys):
    meta = _write_csv(tmp_path / "meta.csv", ROWS)
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000002_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000001_001.png\n00000003_000.png\n")
    out = tmp_path / "s.parquet"
    assert main(["split", "--metadata", str(meta), "--scheme", "official", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # the lists are to blame (both paths named, the patient and its images on each side), not a bug
    assert f"{tmp_path / 'train_val_list.txt'} and {tmp_path / 'test_list.txt'}: 1 patient(s)" in err
    assert "patient 1: " in err and "['00000001_000.png']" in err and "['00000001_001.png']" in err
    assert "bug" not in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".s.parquet*"))


def test_check_patient_disjoint_on_a_built_table():
    ok = pd.DataFrame({"patient": [1, 1, 2], "split": ["train", "train", "test"]})
    check_patient_disjoint(ok)
    with pytest.raises(CxrError, match="1 patient"):
        check_patient_disjoint(ok.assign(split=["train", "val", "test"]))


def test_official_lists_must_cover_metadata(tmp_path, capsys):
    meta = _write_csv(tmp_path / "meta.csv", ROWS)
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n")
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n")
    assert main(["split", "--metadata", str(meta), "--scheme", "official", "--out", str(tmp_path / "s.csv")]) == 2
    assert "neither list" in capsys.readouterr().err


def test_with_no_finding_and_csv_parquet_agree(tmp_path):
    meta = _write_csv(tmp_path / "meta.csv", ROWS)
    for ext in ("csv", "parquet"):
        assert (
            main(
                [
                    "split",
                    "--metadata",
                    str(meta),
                    "--scheme",
                    "random",
                    "--fractions",
                    "0.5,0.25,0.25",
                    "--with-no-finding",
                    "--out",
                    str(tmp_path / f"s.{ext}"),
                ]
            )
            == 0
        )
    a, b = pd.read_csv(tmp_path / "s.csv"), pd.read_parquet(tmp_path / "s.parquet")
    assert list(b.columns) == [*CONTRACT_COLUMNS, "No Finding"]
    assert a["No Finding"].tolist() == b["No Finding"].tolist() == [0, 0, 1, 0]
    assert a["split"].tolist() == b["split"].tolist()
    assert sorted(b.groupby("patient")["split"].first()) == ["test", "train", "val"]


def test_empty_metadata_file_is_a_clean_error(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert main(["split", "--metadata", str(empty), "--scheme", "random", "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {empty}: empty file") and err.count("\n") == 1


def test_patient_id_disagreeing_with_the_nih_name_names_the_line(tmp_path):
    # NIH names are PATIENT_FOLLOWUP.png; the 5th data row (line 6) says patient 999999 for 00000003_001
    rows = [*ROWS, "00000003_001.png,Mass,1,999999,74,F,PA,1,1,1,1"]
    with pytest.raises(CxrError) as err:
        read_metadata(_write_csv(tmp_path / "pid.csv", rows))
    text = str(err.value)
    assert "line 6 (00000003_001.png): Patient ID '999999'" in text and "NIH image name" in text


def test_non_nih_names_are_not_checked_against_the_patient(tmp_path):
    # a generic CSV (names not PATIENT_FOLLOWUP) keeps whatever patient ids it gives
    rows = [r.replace("00000001_000.png", "scan-a.png") for r in ROWS]
    table = read_metadata(_write_csv(tmp_path / "generic.csv", rows))
    assert "scan-a.png" in set(table["image"])


def _patients_csv(path: Path, sizes: list[int]) -> Path:
    """A metadata CSV with patient p (1-based) holding sizes[p-1] images (NIH names, no finding)."""
    rows = [
        f"{p:08d}_{f:03d}.png,No Finding,{f},{p},40,M,PA,1,1,1,1"
        for p, n in enumerate(sizes, start=1)
        for f in range(n)
    ]
    return _write_csv(path, rows)


@pytest.mark.parametrize("scheme", ["random", "stratified"])
def test_a_giant_patient_that_moves_the_image_fractions_is_warned_naming_it(tmp_path, capsys, scheme):
    """Battery 2, 10.5: one 500-image patient among 51 small ones. The shares that are off are
    computed here from the written table with pandas."""
    meta = _patients_csv(tmp_path / "p500.csv", [500] + [2] * 51)
    out = tmp_path / "s.parquet"
    assert (
        main(["split", "--metadata", str(meta), "--scheme", scheme, "--fractions", "0.7,0.1,0.2", "--out", str(out)])
        == 0
    )
    table = pd.read_parquet(out)
    requested = {"train": 0.7, "val": 0.1, "test": 0.2}
    off = {s for s, f in requested.items() if abs((table["split"] == s).mean() - f) > 0.05}
    assert off, "a 500-image patient must move some split's share by more than 5 pp"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and {s for s in requested if f"'{s}' holds " in warnings[0]} == off, warnings
    for s in off:
        share = 100 * (table["split"] == s).mean()
        assert f"'{s}' holds {share:.1f}% of the images ({100 * requested[s]:.0f}% requested)" in warnings[0]
    home = table.loc[table["patient"] == 1, "split"].iloc[0]
    assert f"patient 1 has 500 images (in {home})" in warnings[0] and warnings[0].startswith(f"warning: {meta}: ")


def test_balanced_patients_give_no_fraction_warning(tmp_path, capsys):
    meta = _patients_csv(tmp_path / "even.csv", [2] * 100)
    assert (
        main(
            [
                "split",
                "--metadata",
                str(meta),
                "--scheme",
                "random",
                "--fractions",
                "0.7,0.1,0.2",
                "--out",
                str(tmp_path / "s.parquet"),
            ]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err
