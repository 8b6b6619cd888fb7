"""`python -m shards stats` / prevalence_table against hand counts and the raw NIH files."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import pandas as pd
import pytest

from cxrbase.errors import CxrError
from shards.cli import main
from shards.stats import label_spread, prevalence_table

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

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


def _table(rows: list[tuple[str, str, list[str]]]) -> pd.DataFrame:
    """Splits table from (image, split, findings) with one patient per image."""
    records = []
    for i, (image, split, findings) in enumerate(rows):
        record = {"image": image, "patient": i + 1, "split": split}
        record.update({label: int(label in findings) for label in SPEC_LABELS})
        record.update({"age": 50, "sex": "M", "view": "PA"})
        records.append(record)
    return pd.DataFrame(records)


# Written in val, test, train order on purpose: the output must still be train, val, test.
HAND = _table(
    [
        ("00000005_000.png", "val", ["Mass"]),
        ("00000004_000.png", "test", ["Hernia"]),
        ("00000006_000.png", "test", []),
        ("00000001_000.png", "train", ["Atelectasis", "Effusion"]),
        ("00000002_000.png", "train", []),
        ("00000003_000.png", "train", ["Effusion"]),
    ]
)
# Hand counts: (split, label) → (positives, images, prevalence %); all other labels 0.
HAND_EXPECTED = {
    ("train", "Atelectasis"): (1, 3, 33.33),
    ("train", "Effusion"): (2, 3, 66.67),
    ("train", "No Finding"): (1, 3, 33.33),
    ("val", "Mass"): (1, 1, 100.0),
    ("val", "No Finding"): (0, 1, 0.0),
    ("test", "Hernia"): (1, 2, 50.0),
    ("test", "No Finding"): (1, 2, 50.0),
}


def _expected_rows() -> list[tuple]:
    sizes = {"train": 3, "val": 1, "test": 2}
    return [
        (split, label, *HAND_EXPECTED.get((split, label), (0, sizes[split], 0.0)))
        for split in ("train", "val", "test")
        for label in (*SPEC_LABELS, "No Finding")
    ]


def test_prevalence_table_equals_hand_count():
    table = prevalence_table(HAND)
    assert list(table.columns) == ["split", "label", "positives", "images", "prevalence_pct"]
    assert [tuple(r) for r in table.itertuples(index=False)] == _expected_rows()


def test_stats_csv_cli_equals_hand_count(tmp_path, capsys):
    path = tmp_path / "splits.parquet"
    HAND.to_parquet(path, index=False)
    assert main(["stats", str(path), "--format", "csv"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "split,label,positives,images,prevalence_pct"
    rows = list(csv.reader(io.StringIO(text)))[1:]
    assert len(rows) == 3 * 15
    got = [(s, lab, int(p), int(n), float(pct)) for s, lab, p, n, pct in rows]
    assert got == _expected_rows()
    assert all(len(r[4].split(".")[1]) == 2 for r in rows)  # always two decimals


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_human_formats_list_every_label_and_split(tmp_path, capsys, fmt):
    path = tmp_path / "splits.csv"
    HAND.to_csv(path, index=False)
    assert main(["stats", str(path), "--format", fmt]) == 0
    out = capsys.readouterr().out
    for name in (*SPEC_LABELS, "No Finding", "train (n=3)", "val (n=1)", "test (n=2)", "66.67%"):
        assert name in out
    if fmt == "markdown":
        assert all(line.startswith("|") for line in out.strip().splitlines())


def test_label_spread_is_max_minus_min():
    spread = label_spread(HAND)
    assert spread["Effusion"] == pytest.approx(200 / 3)  # 66.67 (train) − 0 (val, test)
    assert spread["Mass"] == pytest.approx(100.0)
    assert spread["Cardiomegaly"] == 0.0


def test_bad_tables_are_errors(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    HAND.assign(split=["train", "dev", "test", "train", "train", "train"]).to_csv(path, index=False)
    assert main(["stats", str(path)]) == 2
    assert "dev" in capsys.readouterr().err
    HAND.drop(columns=["Hernia"]).to_csv(path, index=False)
    assert main(["stats", str(path)]) == 2
    assert "Hernia" in capsys.readouterr().err
    with pytest.raises(CxrError):
        prevalence_table(HAND.drop(columns=["split"]))


def test_official_test_prevalence_equals_raw_count(nih_dir: Path, tmp_path, capsys):
    out = tmp_path / "official.parquet"
    assert (
        main(
            [
                "split",
                "--metadata",
                str(nih_dir / "Data_Entry_2017_v2020.csv.gz"),
                "--scheme",
                "official",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["stats", str(out), "--format", "csv"]) == 0
    stats = {(r["split"], r["label"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    with gzip.open(nih_dir / "test_list.txt.gz", "rt") as fh:
        test_images = {line.strip() for line in fh if line.strip()}
    with gzip.open(nih_dir / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as fh:
        findings = [r["Finding Labels"] for r in csv.DictReader(fh) if r["Image Index"] in test_images]
    assert len(findings) == 25_596
    for label in (*SPEC_LABELS, "No Finding"):
        positives = sum(label in f for f in findings)
        row = stats[("test", label)]
        assert (int(row["positives"]), int(row["images"])) == (positives, 25_596), label
        assert float(row["prevalence_pct"]) == round(100 * positives / 25_596, 2)


def test_stats_warns_of_train_labels_without_positives_and_a_tiny_val(tmp_path, capsys):
    """Battery 2, 10.1/10.4: by hand, HAND's train split has positives of Atelectasis and Effusion
    only, and its val split is 1 image whose only finding is Mass (every label lacks a class)."""
    path = tmp_path / "splits.parquet"
    HAND.to_parquet(path, index=False)
    assert main(["stats", str(path)]) == 0
    warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning: ")]
    no_train = [label for label in SPEC_LABELS if label not in ("Atelectasis", "Effusion")]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(
        f"warning: {path}: split 'train' has no positive image of {', '.join(no_train)} (12 of 14 labels)"
    )
    no_val = ", ".join(label for label in SPEC_LABELS if label != "Mass")
    assert warnings[1].startswith(
        f"warning: {path}: split 'val' has only 1 image(s); no positive image of {no_val}; "
        "no negative image of Mass (AUROC undefined for 14 of 14 labels)"
    )


def test_stats_of_a_healthy_table_warns_nothing(tmp_path, capsys):
    rows = [
        (f"{i:08d}_000.png", split, [SPEC_LABELS[i % 14]] if i % 3 else [])
        for i, split in enumerate(["train"] * 60 + ["val"] * 60, start=1)
    ]
    path = tmp_path / "splits.parquet"
    _table(rows).to_parquet(path, index=False)
    assert main(["stats", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err
