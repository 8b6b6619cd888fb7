"""Patient-level splits from DICOM headers without writing a patient identifier anywhere:
`shards split --patients-from-dicom DIR --patient-salt-file FILE` → `shards pack`. References: HMAC-SHA256
computed here with the standard library, and a grep of every output file (and the commands' output) for
every identifying header value and the salt."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pandas as pd
import pytest
from dicom_data import IDENTIFYING, dicom_bytes

from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

pytestmark = pytest.mark.integration  # packs shards

SALT = b"k3Jq9vXw2pLm8RtY4uZa7cNe"
PATIENTS = {f"ZZMARKID-{n:04d}": n for n in (11, 12, 13, 14, 15, 16)}  # 6 patients, 3 images each


def _hmac_key(patient_id: str, salt: bytes) -> int:
    return int.from_bytes(hmac.new(salt, patient_id.encode(), hashlib.sha256).digest()[:8], "big") & (2**63 - 1)


@pytest.fixture
def studies(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "dicom"
    folder.mkdir()
    who = {}
    for pid in PATIENTS:
        for visit in range(3):
            name = f"{pid[-2:]}x{visit}.dcm"  # the file names say nothing of the ID
            stored = rng.integers(0, 4096, (40, 48)).astype(np.uint16)
            (folder / name).write_bytes(dicom_bytes(stored, PatientID=pid, WindowCenter=2048, WindowWidth=4096))
            who[name] = pid
    table = pd.DataFrame({"image": sorted(who)})
    for j, label in enumerate(LABELS):
        table[label] = [(i + j) % 2 for i in range(len(table))]
    table.to_csv(tmp_path / "labels.csv", index=False)
    (tmp_path / "salt").write_bytes(SALT + b"\n")
    return tmp_path, folder, who


def _split(root, folder, *extra: str, out: str = "splits.parquet") -> int:
    from shards.cli import main as shards_main

    args = ["split", "--metadata", str(root / "labels.csv"), "--scheme", "random", "--fractions", "0.5,0.25,0.25"]
    return shards_main([*args, "--patients-from-dicom", str(folder), "--out", str(root / out), *extra])


def test_patient_keys_are_the_salted_hash_and_splits_keep_patients_whole(studies, capsys):
    root, folder, who = studies
    assert _split(root, folder, "--patient-salt-file", str(root / "salt")) == 0
    table = pd.read_parquet(root / "splits.parquet")
    want = table["image"].map(lambda name: _hmac_key(who[name], SALT))
    assert (table["patient"] == want).all()
    assert table["patient"].nunique() == len(PATIENTS)
    assert (table.groupby("patient")["split"].nunique() == 1).all()  # patient-level
    assert table["split"].nunique() == 3
    # another salt: other keys, same grouping
    other = root / "salt2"
    other.write_bytes(b"another-salt-of-enough-bytes")
    assert _split(root, folder, "--patient-salt-file", str(other), out="splits2.parquet") == 0
    table2 = pd.read_parquet(root / "splits2.parquet")
    assert not set(table2["patient"]) & set(table["patient"])
    assert (
        table2["patient"] == table2["image"].map(lambda n: _hmac_key(who[n], b"another-salt-of-enough-bytes"))
    ).all()

    from shards.cli import main as shards_main

    args = ["pack", "--splits", str(root / "splits.parquet"), "--images", str(folder), "--out", str(root / "shards")]
    assert shards_main([*args, "--workers", "1"]) == 0
    printed = capsys.readouterr()
    outputs = [p for p in root.rglob("*") if p.is_file() and p.parent != folder and p.name not in ("salt", "salt2")]
    assert any(p.suffix == ".tar" for p in outputs) and any(p.name == "manifest.json" for p in outputs)
    blob = b"".join(p.read_bytes() for p in outputs) + (printed.out + printed.err).encode()
    markers = [*PATIENTS, *IDENTIFYING.values(), SALT.decode(), "another-salt-of-enough-bytes"]
    leaked = [m for m in markers if m.encode() in blob]
    assert not leaked, leaked


def test_salt_from_the_environment_and_refusals(studies, monkeypatch):
    root, folder, who = studies
    monkeypatch.setenv("CXR_PATIENT_SALT", SALT.decode())
    assert _split(root, folder) == 0
    table = pd.read_parquet(root / "splits.parquet")
    assert (table["patient"] == table["image"].map(lambda n: _hmac_key(who[n], SALT))).all()
    monkeypatch.delenv("CXR_PATIENT_SALT")
    from shards.splits import dicom_patients

    meta = pd.DataFrame({"image": sorted(who)})
    with pytest.raises(CxrError, match="no salt"):
        dicom_patients(meta, [folder], None, "t")
    (root / "short").write_bytes(b"tooshort")
    with pytest.raises(CxrError, match="too short"):
        dicom_patients(meta, [folder], str(root / "short"), "t")
    # an image without PatientID: named, and the ID-less file is the only thing said about it
    first = sorted(who)[0]
    (folder / first).write_bytes(dicom_bytes(np.zeros((8, 8), np.uint16), PatientID=""))
    with pytest.raises(CxrError, match=f"{first}: no PatientID"):
        dicom_patients(meta, [folder], str(root / "salt"), "t")
    with pytest.raises(CxrError, match="not in"):
        dicom_patients(pd.DataFrame({"image": ["absent.dcm"]}), [folder], str(root / "salt"), "t")
