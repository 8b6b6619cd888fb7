"""Every split requested with a fraction > 0 gets a patient, or `split` stops with one error naming
the input file and the fix — for NIH-style tables and for the other data sets' adapters alike
(the check lives in shards.splits.assign_by_patient)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dataset_layouts import write_chexpert

from cxrbase.errors import CxrError
from shards.cli import main
from shards.splits import assign_by_patient


def one_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_labelled_csv_with_too_few_patients_names_the_file(tmp_path, capsys):
    csv = tmp_path / "two.csv"
    csv.write_text("image,patient,Thing\na.png,1,1\nb.png,2,0\n")
    # random over 2 patients at 0.5/0.25/0.25: largest remainder gives 1 / 1 / 0 → test is empty
    err = one_error(
        capsys,
        ["split", "--metadata", str(csv), "--scheme", "random", "--fractions", "0.5,0.25,0.25",
         "--out", str(tmp_path / "t.csv")],
    )  # fmt: skip
    assert f"{csv}: split 'test' got no patient (2 patients in all, fractions 0.5,0.25,0.25)" in err
    assert "larger --fractions" in err
    assert not (tmp_path / "t.csv").exists()


def test_dataset_adapter_with_too_few_patients_names_the_root(tmp_path, capsys):
    root = write_chexpert(tmp_path)
    # the fixture's 10 frontal patients at 0.98/0.01/0.01: 9.8 / 0.1 / 0.1 → 10 / 0 / 0 → val is empty
    err = one_error(
        capsys,
        ["split", "--dataset", "chexpert", "--root", str(root), "--scheme", "random",
         "--fractions", "0.98,0.01,0.01", "--out", str(tmp_path / "t.csv")],
    )  # fmt: skip
    assert f"{root}: split 'val' got no patient (10 patients in all, fractions 0.98,0.01,0.01)" in err


def test_assign_by_patient_checks_only_when_told_where():
    meta = pd.DataFrame({"patient": [5, 5, 6], "Effusion": [1, 0, 0]})
    fractions = np.array([0.5, 0.5, 0.0])  # test not requested: never an error
    with pytest.raises(CxrError, match=r"^rows.csv: split 'val' got no patient \(2 patients"):
        assign_by_patient(meta, "random", np.array([0.9, 0.05, 0.05]), seed=0, where="rows.csv")
    assert set(assign_by_patient(meta, "random", fractions, seed=0, where="rows.csv")) == {"train", "val"}
    # without ``where`` (the report's comparison split) an empty split is allowed
    assert set(assign_by_patient(meta, "random", np.array([0.9, 0.05, 0.05]), seed=0)) == {"train"}
