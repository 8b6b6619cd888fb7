"""Tables of two data sets concatenated into one union: their patients must stay apart.

CheXpert numbers its patients 1…64740 and NIH 1…30805; two adapters' tables with the same own
ids must never merge two people into one patient (or split one patient's images as two).
Expectations are counted by hand from the rows written here.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cxrbase.errors import CxrError
from shards.datasets.common import Loaded, build
from shards.splits import assign_by_patient, check_patient_disjoint

# own patient ids of both "data sets": 4 patients, 1 + 2 + 1 + 2 images
OWN = [17, 17, 3, 9, 40, 40]


def loaded(prefix: str) -> Loaded:
    n = len(OWN)
    frame = pd.DataFrame(
        {
            "image": [f"{prefix}/img{i}.jpg" for i in range(n)],
            "patient": np.asarray(OWN, dtype=np.int64),
            "age": np.full(n, np.nan),
            "sex": [None] * n,
            "view": ["PA"] * n,
            "frontal": [True] * n,
            "official": [None] * n,
            "Pleural Effusion": [1.0, 0.0, 1.0, 0.0, 0.0, 1.0],
        }
    )
    return Loaded(frame=frame, findings=["Pleural Effusion"], official=False, read=[])


def args(**kw) -> SimpleNamespace:
    base = {"root": "fixture", "scheme": "random", "fractions": "0.5,0.25,0.25", "seed": 0, "all_views": False}
    return SimpleNamespace(**{**base, **kw})


def union() -> pd.DataFrame:
    a = build(loaded("chexpert"), "chexpert", args())
    b = build(loaded("mimic"), "mimic", args(seed=1))
    return pd.concat([a, b], ignore_index=True)


def test_same_own_ids_in_two_data_sets_are_two_patients():
    table = union()
    # by hand: 4 distinct own ids per data set, none shared across data sets → 8 patients
    assert table["patient"].nunique() == 8
    assert table.groupby("dataset")["patient"].nunique().to_dict() == {"chexpert": 4, "mimic": 4}
    # the own id is the last 17 digits; CheXpert's patient 17 and MIMIC's patient 17 differ
    seventeen = table[table["patient"] % 10**17 == 17]
    assert seventeen.groupby("dataset")["patient"].nunique().to_dict() == {"chexpert": 1, "mimic": 1}
    assert seventeen["patient"].nunique() == 2
    # each table was split on its own; together they are still patient-level (no false "leak")
    check_patient_disjoint(table)


def test_a_union_split_by_patient_counts_each_data_sets_patients():
    table = union()
    meta = table[["patient", "Effusion"]].assign(Effusion=table["Effusion"].astype(float))
    split = assign_by_patient(meta, "random", np.array([0.5, 0.25, 0.25]), seed=0)
    per = pd.DataFrame({"patient": table["patient"], "split": split}).groupby("split")["patient"].nunique()
    # random_assign over 8 patients at 0.5/0.25/0.25: exactly 4 / 2 / 2 patients (own ids alone: 4 → 2/1/1)
    assert per.to_dict() == {"train": 4, "val": 2, "test": 2}
    # every image of one (data set, own id) pair is in one split
    pairs = pd.DataFrame({"d": table["dataset"], "own": table["patient"] % 10**17, "split": split})
    assert (pairs.groupby(["d", "own"])["split"].nunique() == 1).all()


def test_an_own_id_beyond_the_namespace_is_refused():
    bad = loaded("chexpert")
    bad.frame.loc[0, "patient"] = 10**17
    with pytest.raises(CxrError, match=r"fixture: 1 chexpert patient id\(s\) outside"):
        build(bad, "chexpert", args())


def test_nih_table_patients_are_the_csvs_patient_ids(tmp_path, nih_dir):
    """NIH keeps its own ids (no namespace): the table's patient is the real CSV's Patient ID."""
    from shards.cli import main

    csv = nih_dir / "Data_Entry_2017_v2020.csv.gz"
    out = tmp_path / "nih.parquet"
    assert main(["split", "--metadata", str(csv), "--scheme", "official", "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    raw = pd.read_csv(csv, usecols=["Image Index", "Patient ID"])
    assert (table.set_index("image")["patient"].loc[raw["Image Index"]].to_numpy() == raw["Patient ID"]).all()
    assert table["patient"].max() == raw["Patient ID"].max() == 30805
