"""Unknown and uncertain labels (issue 26): a labelled CSV with empty cells (unknown) and -1
(uncertain) goes through `shards split` and `shards pack --uncertain ...` into `.labels` bytes
with 255 for a masked entry; the manifest counts only known entries.

References: the label cells this test writes into the CSV, by hand (no code under test
computes the expectation), and the raw tar members read with the standard library's tarfile.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import png_bytes

from cxrbase.labels import UNKNOWN
from shards.cli import main as shards_main

# image, A, B, C — "" unknown, -1 uncertain (C is a label this "data set" lacks for some images)
ROWS = [
    ("p00.png", "1", "0", ""),
    ("p01.png", "0", "-1", ""),
    ("p02.png", "1", "1", "0"),
    ("p03.png", "0", "", "1"),
    ("p04.png", "-1", "0", "1"),
    ("p05.png", "0", "0", ""),
    ("p06.png", "1", "-1", "0"),
    ("p07.png", "", "1", "0"),
]
NAMES = ("A", "B", "C")


def _expected(cell: str, policy: str) -> int:
    """A table cell → the `.labels` byte under an --uncertain policy, by hand."""
    if cell == "":
        return UNKNOWN
    if cell == "-1":
        return {"ignore": UNKNOWN, "zeros": 0, "ones": 1}[policy]
    return int(cell)


def _write_csv(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, *_ in ROWS:
        (images / name).write_bytes(png_bytes(rng.integers(0, 255, (32, 32), dtype=np.uint8)))
    lines = ["image,A,B,C,patient"] + [f"{n},{a},{b},{c},{i}" for i, (n, a, b, c) in enumerate(ROWS)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def _split_and_pack(root: Path, policy: str | None) -> Path:
    csv = _write_csv(root) if not (root / "labels.csv").exists() else root / "labels.csv"
    if not (root / "splits.csv").exists():
        args = ["split", "--metadata", str(csv), "--scheme", "random", "--fractions", "0.5,0.25,0.25"]
        assert shards_main([*args, "--seed", "0", "--out", str(root / "splits.csv")]) == 0
    out = root / f"shards-{policy}"
    extra = [] if policy is None else ["--uncertain", policy]
    args = ["pack", "--splits", str(root / "splits.csv"), "--images", str(root / "images")]
    assert shards_main([*args, "--out", str(out), "--workers", "1", *extra]) == 0
    return out


def _members(shards: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.mark.parametrize("policy", [None, "ignore", "zeros", "ones"])
def test_pack_writes_255_for_unknown_and_resolves_uncertain_by_policy(tmp_path, policy):
    shards = _split_and_pack(tmp_path, policy)
    effective = policy or "ignore"  # the default is the CheXpert paper's U-Ignore
    members = _members(shards)
    assert sorted(members) == sorted(n.removesuffix(".png") for n, *_ in ROWS)
    for name, *cells in ROWS:
        got = members[name.removesuffix(".png")]
        want = [_expected(c, effective) for c in cells]
        assert list(got["labels"]) == want, name
        record = json.loads(got["json"])
        assert record["labels"] == [None if y == UNKNOWN else y for y in want]
        assert record["findings"] == [n for n, y in zip(NAMES, want) if y == 1]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["uncertain"] == effective
    splits = pd.read_csv(tmp_path / "splits.csv", dtype={"image": str})
    unknown = 0
    for split, stats in manifest["splits"].items():
        rows = [cells for n, *cells in ROWS if n in set(splits.loc[splits["split"] == split, "image"])]
        for c, label in enumerate(NAMES):
            values = [_expected(r[c], effective) for r in rows]
            pos, known = sum(v == 1 for v in values), sum(v != UNKNOWN for v in values)
            unknown += len(values) - known
            assert stats["positives"][label] == pos
            assert stats["known"][label] == known
            assert stats["prevalence"][label] == (round(pos / known, 6) if known else None)
    assert manifest["unknown_labels"] == unknown
    from shards.verify import verify

    report = verify(shards, workers=1)  # .labels vs .json, findings, positives and known per split
    assert report.ok, report.failures


def test_split_table_keeps_unknown_and_uncertain_cells(tmp_path):
    _split_and_pack(tmp_path, "ignore")
    table = pd.read_csv(tmp_path / "splits.csv", dtype={"image": str}).set_index("image")
    for name, *cells in ROWS:
        for label, cell in zip(NAMES, cells):
            value = table.at[name, label]
            assert np.isnan(value) if cell == "" else value == int(cell), (name, label, value)


def test_stats_counts_prevalence_over_known_images(tmp_path, capsys):
    _split_and_pack(tmp_path, "ignore")
    capsys.readouterr()
    assert shards_main(["stats", str(tmp_path / "splits.csv"), "--format", "csv"]) == 0
    got = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out))
    splits = pd.read_csv(tmp_path / "splits.csv", dtype={"image": str})
    for split in got["split"].unique():
        rows = [cells for n, *cells in ROWS if n in set(splits.loc[splits["split"] == split, "image"])]
        for c, label in enumerate(NAMES):
            line = got[(got["split"] == split) & (got["label"] == label)].iloc[0]
            known = [r[c] for r in rows if r[c] in ("0", "1")]  # uncertain is not known either
            assert line["images"] == len(known)
            assert line["positives"] == known.count("1")


def test_a_label_value_outside_1_0_minus1_blank_is_a_one_line_error(tmp_path, capsys):
    csv = _write_csv(tmp_path)
    csv.write_text(csv.read_text().replace("p03.png,0,,1", "p03.png,0,2,1"))
    assert shards_main(["split", "--metadata", str(csv), "--scheme", "random", "--out", str(tmp_path / "s.csv")]) != 0
    assert "labels.csv: line 5 (p03.png): B '2' is not 1, 0, -1 (uncertain) or empty" in capsys.readouterr().err
    table = pd.DataFrame(
        {
            "image": ["a.png"],
            "patient": [1],
            "split": ["train"],
            "A": [0.5],
            "age": [None],
            "sex": [None],
            "view": [None],
        }
    )
    table.to_csv(tmp_path / "bad.csv", index=False)
    args = ["pack", "--splits", str(tmp_path / "bad.csv"), "--images", str(tmp_path / "images")]
    assert shards_main([*args, "--out", str(tmp_path / "o"), "--workers", "1"]) != 0
    assert "a label value other than 1, 0, -1 (uncertain) or empty" in capsys.readouterr().err
