"""Startup costs that grow with the data set: the val split is read once before epoch 1, and the
class counts behind the val_mean_auroc check come from the manifest (pack's per-split statistics)
or from that same pass — never from a second read of every val sample."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import build_synth_shards, rewrite_shard

from cxr.config import load_config
from cxr.data import build_loader, shard_index
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_synth_shards(tmp_path_factory.mktemp("scale"))


def _config(shards: Path, *extra: str):
    return load_config(
        ROOT / "cxr/configs/tiny.yaml",
        [f"data.shards={shards}", "data.resolution=64", "data.backend=wds", "train.best_metric=val_mean_auroc", *extra],
    )


def _val_reference(shards: Path) -> tuple[np.ndarray, int]:
    """Positives per label and samples of the val split, from the splits table pack was given."""
    table = pd.read_parquet(shards.parent / "splits.parquet")
    val = table[table["split"] == "val"]
    return val[list(LABELS)].to_numpy(np.int64).sum(axis=0), len(val)


def _run_check(cfg, monkeypatch) -> tuple[Counter, list]:
    """check_val_split on one rank, counting SampleReader.read per sample and capturing the counts
    handed to the AUROC check."""
    from cxr import train_setup

    reads, seen = Counter(), []
    real_read, real_check = shard_index.SampleReader.read, train_setup.check_auroc_defined

    def counting_read(self, i, *args, **kwargs):
        reads[self.index.keys[i]] += 1
        return real_read(self, i, *args, **kwargs)

    def capture(cfg, positives, samples):
        seen.append((np.asarray(positives), samples))
        return real_check(cfg, positives, samples)

    monkeypatch.setattr(shard_index.SampleReader, "read", counting_read)
    monkeypatch.setattr(train_setup, "check_auroc_defined", capture)
    train_setup.check_val_split(cfg, build_loader, rank=0, world=1)
    return reads, seen


def test_val_split_read_once_counts_from_manifest(shards, monkeypatch):
    positives, samples = _val_reference(shards)
    reads, seen = _run_check(_config(shards), monkeypatch)
    assert len(reads) == samples and set(reads.values()) == {1}  # each val sample read exactly once
    assert len(seen) == 1 and seen[0][1] == samples
    np.testing.assert_array_equal(seen[0][0], positives)


def test_manifest_without_counts_uses_the_one_pass(shards, tmp_path, monkeypatch):
    """An older or hand-made manifest without splits.val.positives: the counts come from the pass
    that checks the bytes (still one read per sample), equal to the splits table's."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["splits"]["val"]["positives"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    positives, samples = _val_reference(shards)
    reads, seen = _run_check(_config(copy), monkeypatch)
    assert len(reads) == samples and set(reads.values()) == {1}
    assert len(seen) == 1 and seen[0][1] == samples
    np.testing.assert_array_equal(seen[0][0], positives)


@pytest.mark.parametrize("drop_counts", [False, True])
def test_corrupt_val_sample_still_fails_before_training(shards, tmp_path, monkeypatch, drop_counts):
    """Either way the counts are found, a flipped byte in a val image stops the run with the
    sample's one-line error."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if drop_counts:
        del manifest["splits"]["val"]["positives"]
        (copy / "manifest.json").write_text(json.dumps(manifest))
    shard = next(s["name"] for s in manifest["shards"] if s["split"] == "val")

    def flip(name: str, data: bytes) -> bytes:
        if name.endswith(".png"):
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            return bytes(data)
        return data

    rewrite_shard(copy, shard, flip)
    with pytest.raises(CxrError, match="is corrupt"):
        _run_check(_config(copy), monkeypatch)
