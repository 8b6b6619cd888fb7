"""`python -m shards synth`: determinism, NIH-format outputs, split on it, planted signatures.

Outputs are read back with csv and PIL only; signature checks compare plain pixel means in
fixed regions between images with and without the label (AUROC by scikit-learn).
"""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from shards.cli import main
from shards.synth import floored_row_weights

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
NIH_V2020_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def _synth(out: Path, n: int, *extra: str, resolution: int = 64, seed: int = 0) -> Path:
    assert (
        main(["synth", "--out", str(out), "--n", str(n), "--resolution", str(resolution), "--seed", str(seed), *extra])
        == 0
    )
    return out


def _rows(out: Path) -> list[dict]:
    with open(out / "Data_Entry_2017.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory.mktemp("synth") / "a", 40, "--workers", "2")


@pytest.fixture(scope="module")
def signatures(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """300 phantoms at 64 px: pixels [N, 64, 64] float and labels [N, 14] from the CSV text."""
    out = _synth(tmp_path_factory.mktemp("synth") / "sig", 300, "--workers", "2", seed=3)
    rows = _rows(out)
    pixels = np.stack([np.asarray(Image.open(out / "images" / r["Image Index"]), dtype=np.float64) for r in rows])
    labels = np.array([[int(lab in r["Finding Labels"].split("|")) for lab in SPEC_LABELS] for r in rows])
    return pixels, labels


def test_same_seed_same_bytes_any_workers(small, tmp_path):
    again = _synth(tmp_path / "b", 40, "--workers", "1")
    a, b = _files(small), _files(again)
    assert len(a) == 40 + 4 and a == b  # images, Data_Entry, two lists, boxes.csv


def test_different_seed_different_images(small, tmp_path):
    other = _files(_synth(tmp_path / "c", 40, seed=1))
    mine = _files(small)
    pngs = [k for k in mine if k.endswith(".png") and k in other]
    assert sum(mine[k] != other[k] for k in pngs) >= 0.9 * len(pngs)
    assert mine["Data_Entry_2017.csv"] != other["Data_Entry_2017.csv"]


def test_header_is_the_real_nih_header(small, nih_dir):
    header = (small / "Data_Entry_2017.csv").read_text().splitlines()[0]
    with gzip.open(nih_dir / "Data_Entry_2017_v2020.csv.gz", "rt") as fh:
        assert header == fh.readline().strip()


def test_outputs_follow_nih_format(small):
    assert (small / "Data_Entry_2017.csv").read_text().splitlines()[0] == NIH_V2020_HEADER
    rows = _rows(small)
    assert len(rows) == 40
    follow_ups: dict[str, list[int]] = {}
    for r in rows:
        assert re.fullmatch(r"(\d{8})_(\d{3})\.png", r["Image Index"])
        assert int(r["Patient ID"]) == int(r["Image Index"][:8])
        assert r["Patient Gender"] in ("M", "F") and r["View Position"] in ("PA", "AP")
        assert 0 <= int(r["Patient Age"]) < 120
        names = r["Finding Labels"].split("|")
        assert names == ["No Finding"] or set(names) <= set(SPEC_LABELS)
        follow_ups.setdefault(r["Patient ID"], []).append(int(r["Follow-up #"]))
        with Image.open(small / "images" / r["Image Index"]) as im:
            assert (im.mode, im.size, im.format) == ("L", (64, 64), "PNG")
    assert all(v == list(range(len(v))) for v in follow_ups.values())
    assert max(map(len, follow_ups.values())) > 1  # several images per patient


def test_lists_are_patient_disjoint(small):
    images = {r["Image Index"] for r in _rows(small)}
    test = set((small / "test_list.txt").read_text().split())
    train_val = set((small / "train_val_list.txt").read_text().split())
    assert test | train_val == images and not test & train_val
    assert not {i[:8] for i in test} & {i[:8] for i in train_val}
    patients = {i[:8] for i in images}
    assert len({i[:8] for i in test}) == round(0.2 * len(patients))


def test_split_official_runs_on_synth(small, tmp_path):
    out = tmp_path / "splits.parquet"
    assert (
        main(["split", "--metadata", str(small / "Data_Entry_2017.csv"), "--scheme", "official", "--out", str(out)])
        == 0
    )
    table = pd.read_parquet(out)
    assert len(table) == 40
    assert set(table.loc[table["split"] == "test", "image"]) == set((small / "test_list.txt").read_text().split())
    assert (table.groupby("patient")["split"].nunique() == 1).all()


def _region(pixels: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    n = pixels.shape[1]
    return pixels[:, int(y0 * n) : int(y1 * n), int(x0 * n) : int(x1 * n)].mean(axis=(1, 2))


def test_cardiomegaly_brightens_the_left_heart_border(signatures):
    pixels, labels = signatures
    y = labels[:, SPEC_LABELS.index("Cardiomegaly")]
    region = _region(pixels, 0.66, 0.72, 0.58, 0.64)  # lung just beyond a normal heart's border
    assert y.sum() >= 8
    assert region[y == 1].mean() - region[y == 0].mean() > 30
    assert roc_auc_score(y, region) > 0.9


def test_effusion_fills_a_costophrenic_angle(signatures):
    pixels, labels = signatures
    y = labels[:, SPEC_LABELS.index("Effusion")]
    angles = np.maximum(_region(pixels, 0.2, 0.3, 0.58, 0.66), _region(pixels, 0.7, 0.8, 0.58, 0.66))
    assert roc_auc_score(y, angles) > 0.85


def test_emphysema_darkens_the_lungs(signatures):
    pixels, labels = signatures
    y = labels[:, SPEC_LABELS.index("Emphysema")]
    lung = _region(pixels, 0.22, 0.38, 0.3, 0.5)
    assert roc_auc_score(y, -lung) > 0.75


def test_priors_give_every_label_positives(signatures):
    _, labels = signatures
    assert (labels.mean(axis=0) >= 0.025).all(), dict(zip(SPEC_LABELS, labels.mean(axis=0)))
    assert 0.2 < (labels.sum(axis=1) == 0).mean() < 0.6


def test_real_cooccurrence_with_floor(nih_dir, tmp_path):
    meta = nih_dir / "Data_Entry_2017_v2020.csv.gz"
    out = _synth(tmp_path / "real", 400, "--metadata", str(meta), "--workers", "1", resolution=32)
    with gzip.open(meta, "rt", newline="") as fh:
        real_sets = {frozenset(r["Finding Labels"].split("|")) for r in csv.DictReader(fh)}
    rows = _rows(out)
    assert all(frozenset(r["Finding Labels"].split("|")) in real_sets for r in rows)
    for label in SPEC_LABELS:  # floor 5 %: ≥ 10 of 400 is > 4 sd below the floor's mean of 20
        assert sum(label in r["Finding Labels"].split("|") for r in rows) >= 10, label


def test_floored_weights_reach_the_floor():
    rng = np.random.default_rng(0)
    y = (rng.random((5000, 14)) < np.linspace(0.002, 0.3, 14)).astype(np.uint8)
    w = floored_row_weights(y, floor=0.05)
    assert w.sum() == pytest.approx(1.0) and (w > 0).all()
    assert ((w @ y) >= 0.0499).all()


def test_stale_images_are_refused(tmp_path, capsys):
    out = tmp_path / "stale"
    (out / "images").mkdir(parents=True)
    (out / "images" / "99999999_000.png").write_bytes(b"x")
    assert main(["synth", "--out", str(out), "--n", "2", "--resolution", "32"]) == 2
    assert "would not write" in capsys.readouterr().err
    assert (out / "images" / "99999999_000.png").read_bytes() == b"x"


def test_boxes_csv_records_every_drawn_finding(small, nih_dir):
    """boxes.csv: the NIH BBox_List header, boxes inside the image, one per drawn finding at least."""
    text = (small / "boxes.csv").read_text().splitlines()
    with gzip.open(nih_dir / "BBox_List_2017.csv.gz", "rt") as fh:
        nih_header = fh.readline().strip()
    assert text[0] == nih_header == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    boxes: dict[str, set[str]] = {}
    for line in text[1:]:
        image, label, *xywh = line.split(",")
        x, y, w, h = map(int, xywh)
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64, line
        boxes.setdefault(image, set()).add(label)
    for r in _rows(small):
        drawn = set(r["Finding Labels"].split("|")) - {"No Finding", "Emphysema"}  # Emphysema: whole lungs, no box
        assert boxes.get(r["Image Index"], set()) == drawn, r["Image Index"]


def test_nodule_boxes_hold_the_bright_lesion(tmp_path):
    """Pixels: a Nodule box is brighter than the ring of lung around it, image by image."""
    out = _synth(tmp_path / "nod", 60, "--workers", "1", resolution=128, seed=5)
    brighter, total = 0, 0
    for line in (out / "boxes.csv").read_text().splitlines()[1:]:
        image, label, *xywh = line.split(",")
        if label != "Nodule":
            continue
        x, y, w, h = map(int, xywh)
        px = np.asarray(Image.open(out / "images" / image), dtype=np.float64)
        inner = px[y : y + h, x : x + w].mean()
        ring = px[max(y - h, 0) : y + 2 * h, max(x - w, 0) : x + 2 * w]
        outer = (ring.sum() - px[y : y + h, x : x + w].sum()) / (ring.size - w * h)
        brighter += inner > outer
        total += 1
    assert total >= 5 and brighter >= 0.9 * total, (brighter, total)


def test_fine_detail_survives_only_at_high_resolution(tmp_path):
    """--fine-detail: other images byte-identical to the default; the label's tiny nodules are
    found by a plain top-hat detector at the synth resolution, not after downsampling 4×."""
    from scipy.ndimage import median_filter

    base = _synth(tmp_path / "base", 160, "--workers", "2", resolution=128, seed=1)
    fine = _synth(tmp_path / "fine", 160, "--workers", "2", "--fine-detail", "Nodule", resolution=128, seed=1)
    rows = _rows(fine)
    y = np.array(["Nodule" in r["Finding Labels"].split("|") for r in rows])
    assert 5 <= y.sum() < len(y) - 5
    for r, positive in zip(rows, y):
        same = (base / "images" / r["Image Index"]).read_bytes() == (fine / "images" / r["Image Index"]).read_bytes()
        assert same != positive, r["Image Index"]

    def tophat_auroc(size: int) -> float:
        peaks = []
        for r in rows:
            im = Image.open(fine / "images" / r["Image Index"])
            if size != 128:
                im = im.resize((size, size), Image.LANCZOS)
            a = np.asarray(im, dtype=np.float64)
            c = size // 4
            peaks.append((a - median_filter(a, size=5))[c : 3 * c, size // 8 : 7 * size // 8].max())
        return roc_auc_score(y, peaks)

    assert tophat_auroc(128) > 0.95
    assert tophat_auroc(32) < 0.7


def test_fine_detail_unknown_label(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--n", "4", "--fine-detail", "Nodules"]) == 2
    assert "--fine-detail Nodules: not a label" in capsys.readouterr().err
