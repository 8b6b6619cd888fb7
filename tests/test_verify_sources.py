"""`cxr-shards verify --against ROOT --splits TABLE` on the layouts of `split --dataset` (JPEG, DICOM and
16-bit PNG sources named by paths relative to ROOT): every packed image is compared with its source.

The reference is the sources themselves: untouched, every image matches; with one source's bytes
replaced by another's (a different image of the same format), exactly that key is reported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from dataset_layouts import write_chexpert, write_padchest, write_vindr

from shards.cli import main
from shards.records import image_key

pytestmark = pytest.mark.integration

LAYOUTS = {
    "chexpert": (write_chexpert, []),
    "vindr": (write_vindr, []),
    "padchest": (write_padchest, ["--fractions", "0.5,0.25,0.25"]),
}


def _packed(tmp_path: Path, dataset: str, *pack_args: str) -> tuple[Path, Path, Path]:
    write, split_args = LAYOUTS[dataset]
    root = write(tmp_path / dataset)
    table = tmp_path / f"{dataset}.parquet"
    assert main(["split", "--dataset", dataset, "--root", str(root), *split_args, "--out", str(table)]) == 0
    out = tmp_path / "shards"
    assert (
        main(["pack", "--splits", str(table), "--images", str(root), "--out", str(out), "--workers", "1", *pack_args])
        == 0
    )
    return root, table, out


@pytest.mark.parametrize(
    "dataset, pack_args",
    [("chexpert", []), ("chexpert", ["--codec", "jpeg"]), ("vindr", []), ("padchest", [])],
    ids=["chexpert-png", "chexpert-jpeg", "vindr-dicom", "padchest-16bit"],
)
def test_verify_against_a_data_set_root_checks_every_source(tmp_path, capsys, dataset, pack_args):
    root, table, out = _packed(tmp_path, dataset, *pack_args)
    args = ["verify", str(out), "--workers", "1", "--against", str(root), "--splits", str(table)]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().out
    images = sorted(pd.read_parquet(table)["image"])
    assert len(images) >= 3 and all("/" in image for image in images)

    # one source now holds another image of the same format: exactly its key differs
    victim, donor = root / images[0], root / images[1]
    shutil.copyfile(donor, victim)
    capsys.readouterr()
    assert main(args) == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and image_key(images[0]) in failures[0] and "pixels differ from" in failures[0]
    assert str(victim) in failures[0]


def test_against_a_data_set_root_without_its_table_is_a_one_line_error_naming_the_fix(tmp_path, capsys):
    root, _table, out = _packed(tmp_path, "chexpert")
    capsys.readouterr()
    assert main(["verify", str(out), "--workers", "1", "--against", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "add --splits TABLE" in err[0] and str(out) in err[0]


def test_splits_without_against_is_a_one_line_error(tmp_path, capsys):
    root, table, out = _packed(tmp_path, "chexpert")
    capsys.readouterr()
    assert main(["verify", str(out), "--splits", str(table)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--against ROOT" in err[0]
