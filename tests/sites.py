"""Phantom "sites" for the masked-label and cross-site tests: `shards synth` phantoms written as
generic labelled CSVs (`image,<labels>,patient`) whose label columns the test chooses — some
renamed, some left blank (unknown) — then `shards split` and `shards pack`, as a user would.

The truth of every (image, label) is the CSV the test wrote (`Site.truth`), never the shards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from helpers import shards_config

from shards.cli import main as shards_main

RES = 64


@dataclass
class Site:
    shards: Path
    truth: pd.DataFrame  # index: key (image without .png); one column per packed label: 1.0/0.0/NaN


def synth(root: Path, n: int, seed: int) -> pd.DataFrame:
    """Phantoms at RES px → DataFrame image, patient, and one 0/1 column per NIH label."""
    args = ["synth", "--out", str(root / "synth"), "--n", str(n), "--resolution", str(RES), "--seed", str(seed)]
    assert shards_main([*args, "--workers", "1"]) == 0
    entry = pd.read_csv(root / "synth" / "Data_Entry_2017.csv")
    findings = entry["Finding Labels"].str.split("|")
    from cxrbase.labels import LABELS

    frame = pd.DataFrame({"image": entry["Image Index"], "patient": entry["Patient ID"]})
    for label in LABELS:
        frame[label] = findings.map(lambda names, label=label: int(label in names))
    return frame


def pack_site(root: Path, table: pd.DataFrame, columns: dict[str, str], images: Path, seed: int = 0) -> Site:
    """Write ``table``'s columns (``{csv name: source column}``; a source of None = all blank) as a
    labelled CSV, split it by patient and pack it. Cells already NaN in ``table`` stay blank."""
    csv = pd.DataFrame({"image": table["image"]})
    for name, source in columns.items():
        csv[name] = np.nan if source is None else table[source]
    csv["patient"] = table["patient"]
    text = csv.to_csv(index=False, float_format="%.0f", lineterminator="\n")
    (root / "labels.csv").write_text(text)
    split = ["split", "--metadata", str(root / "labels.csv"), "--scheme", "random", "--fractions", "0.5,0.2,0.3"]
    assert shards_main([*split, "--seed", str(seed), "--out", str(root / "splits.csv")]) == 0
    pack = ["pack", "--splits", str(root / "splits.csv"), "--images", str(images), "--out", str(root / "shards")]
    assert shards_main([*pack, "--workers", "1"]) == 0
    truth = csv.assign(key=csv["image"].str.removesuffix(".png")).set_index("key")[list(columns)].astype(float)
    return Site(root / "shards", truth)


def train_config(run: Path, shards: Path, *extra: str):
    return shards_config(run, shards, RES, *extra)
