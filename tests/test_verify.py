"""verify: passes on good shards, and names the shard/key/reason of each kind of damage.

Damage is made with Python's tarfile and hashlib (not the packer's writer), and the
manifest is patched so that only the intended check can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import rewrite_shard
from PIL import Image

from cxrbase.labels import LABELS
from shards.cli import main as cli
from shards.pack import pack
from shards.verify import verify

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)


def tiny_config(tmp: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp / "images"
    folder.mkdir()
    rows = []
    for i in range(n):
        key = f"{i + 1:08d}_000"
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(folder / f"{key}.png")
        rows.append(
            {
                "image": f"{key}.png",
                "patient": 100 + i // 2,
                "split": ("train", "test")[i // 4],
                **{name: int(rng.random() < 0.4) for name in LABELS},
                "age": 20 + 7 * i,
                "sex": "MF"[i % 2],
                "view": "PA",
            }
        )
    out = tmp / "shards"
    pack(pd.DataFrame(rows), [folder], out, shard_size_mb=0.03, workers=1)
    return out


@pytest.fixture
def packed(tmp_path) -> Path:
    return tiny_config(tmp_path)


def test_good_shards_pass(packed):
    report = verify(packed, workers=1)
    assert report.ok, report.failures
    assert report.samples == 6 and report.shards == len(json.loads((packed / "manifest.json").read_text())["shards"])
    assert cli(["verify", str(packed), "--workers", "1"]) == 0


def test_flipped_byte_fails_checksum(packed, capsys):
    shard = packed / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli(["verify", str(packed), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL train-000000.tar: size/sha256 differ" in out


def test_undecodable_image_named_by_key(packed):
    rewrite_shard(packed, "train-000000.tar", lambda name, d: d[: len(d) // 2] if name.endswith(".png") else d)
    failures = verify(packed, workers=1).failures
    assert failures and all(f.startswith("train-000000.tar: 0000000") for f in failures), failures
    assert any("truncated" in f or "undecodable" in f for f in failures)


def test_labels_differing_from_json(packed):
    flip = lambda name, d: bytes([1 - d[0]]) + d[1:] if name == "00000001_000.labels" else d  # noqa: E731
    rewrite_shard(packed, "train-000000.tar", flip)
    failures = verify(packed, workers=1).failures
    assert any("00000001_000: .labels differ from the .json labels" in f for f in failures), failures


def test_meta_and_id_differing(packed):
    def change(name, data):
        if name == "00000002_000.meta":
            return np.frombuffer(data, "<f4").copy().__iadd__(np.array([1, 0, 0, 0, 0], "<f4")).tobytes()
        if name == "00000002_000.id":
            return b"00000009_000".ljust(32, b"\0")
        return data

    rewrite_shard(packed, "train-000000.tar", change)
    failures = " | ".join(verify(packed, workers=1).failures)
    assert ".meta differs" in failures and ".id is not the NUL-padded key" in failures


def test_missing_shard_unlisted_tar_and_stale_index(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    first, last = manifest["shards"][0], manifest["shards"][-1]
    (packed / first["name"]).rename(packed / "stray.tar")
    (packed / last["index"]).write_text("v1.2 0\n")
    failures = " | ".join(verify(packed, workers=1).failures)
    assert f"{first['name']}: shard file is missing" in failures
    assert "stray.tar: tar file not listed in the manifest" in failures
    assert f"{last['index']}: DALI index missing or not matching" in failures
    assert "samples /" in failures  # split totals no longer add up


def test_no_manifest_is_a_clear_error(tmp_path, capsys):
    assert cli(["verify", str(tmp_path)]) == 2
    assert "manifest.json: no shards manifest" in capsys.readouterr().err


def test_patient_in_two_splits_fails(packed):
    # give test sample 00000005_000 (patient 102) the train patient 100, as an edited table would
    def move(name, data):
        if name == "00000005_000.json":
            return data.replace(b'"patient":102', b'"patient":100')
        return data

    manifest = json.loads((packed / "manifest.json").read_text())
    shard = next(s["name"] for s in manifest["shards"] if s["split"] == "test")
    rewrite_shard(packed, shard, move)
    failures = verify(packed, workers=1).failures
    leak = [f for f in failures if f.startswith("patient 100:")]
    assert leak and "test ['00000005_000']" in leak[0] and "train ['00000001_000', '00000002_000'" in leak[0], failures


def test_member_changed_with_a_consistent_json_fails_its_checksum(packed):
    # .labels and the .json labels/findings edited together: only the pack-time crc32 can tell
    def change(name, data):
        if name == "00000001_000.labels":
            return bytes([1 - data[0]]) + data[1:]
        if name == "00000001_000.json":
            record = json.loads(data)
            record["labels"][0] = 1 - record["labels"][0]
            record["findings"] = [n for n, y in zip(LABELS, record["labels"]) if y]
            return json.dumps(record, separators=(",", ":")).encode()
        return data

    rewrite_shard(packed, "train-000000.tar", change)
    failures = verify(packed, workers=1).failures
    assert any(f.startswith("train-000000.tar: 00000001_000: .labels checksum mismatch") for f in failures), failures


@pytest.mark.parametrize("field", ["name", "index"])
def test_manifest_names_outside_the_folder_are_refused_where_the_manifest_is_read(packed, tmp_path, capsys, field):
    """Battery 2, 12.2: a manifest naming ``../x`` made the loader and verify open files outside the
    shards folder. Here ``../`` points at a real copy of the shard (and its index), which the
    old readers accepted; now the manifest itself is refused, by verify and by the loader."""
    import shutil

    from cxr.data import DataConfig, build_loader
    from cxrbase.errors import CxrError

    manifest = json.loads((packed / "manifest.json").read_text())
    entry = manifest["shards"][0]
    shutil.copy(packed / entry[field], tmp_path / entry[field])  # the same bytes, one folder up
    bad = f"../{entry[field]}"
    entry[field] = bad
    (packed / "manifest.json").write_text(json.dumps(manifest))
    assert cli(["verify", str(packed)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {packed / 'manifest.json'}: shard {field} {bad!r} is not a file name in this folder — "
        "the loaders and verify open only files beside manifest.json; restore the manifest or re-run "
        "`python -m shards pack`"
    ), err
    with pytest.raises(CxrError, match=f"shard {field} '../"):
        build_loader(DataConfig(shards=str(packed), backend="wds", resolution=64, num_threads=0), entry["split"])
