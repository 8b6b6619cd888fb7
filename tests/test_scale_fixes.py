"""Startup costs that grow with the data set: the val split is read once before epoch 1, and the
class counts behind the val_mean_auroc check come from the manifest (pack's per-split statistics)
or from that same pass — never from a second read of every val sample."""

from __future__ import annotations

import json
import shutil
import tarfile
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
    from cxr.training import setup as train_setup

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
    assert len(seen) == 1 and np.all(np.asarray(seen[0][1]) == samples)
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
    assert len(seen) == 1 and np.all(np.asarray(seen[0][1]) == samples)
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


# ------------------------------------------------------------------ the split index, once per run
def _counting_read_index(monkeypatch) -> Counter:
    calls, real = Counter(), shard_index.read_index

    def counting(idx):
        calls[Path(idx).name] += 1
        return real(idx)

    monkeypatch.setattr(shard_index, "read_index", counting)
    return calls


def _train_index_files(folder: Path) -> list[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sorted(e["index"] for e in manifest["shards"] if e["split"] == "train")


def _tar_keys(folder: Path, names: list[str]) -> list[str]:
    """Sample keys of these shards in tar order, read with tarfile (an independent reader)."""
    keys = []
    for name in names:
        with tarfile.open(folder / name.replace(".idx", ".tar")) as tar:
            for member in tar.getnames():
                key = member.split(".")[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def test_each_epochs_loader_reuses_the_split_index(shards, tmp_path, monkeypatch):
    """The loaders are built afresh every epoch; the .idx files are parsed once per run, not per
    epoch, and each epoch still draws its own permutation of the same samples."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    cfg = _config(copy).data
    calls = _counting_read_index(monkeypatch)
    epochs = [
        [k for b in build_loader(cfg, "train", rank=0, world_size=1, epoch=e) for k in b["key"]] for e in range(3)
    ]
    assert sorted(calls) == _train_index_files(copy) and set(calls.values()) == {1}  # not once per epoch
    assert epochs[0] != epochs[1] and set(epochs[0]) <= set(_tar_keys(copy, _train_index_files(copy)))


def test_a_rewritten_shard_is_indexed_again(shards, tmp_path, monkeypatch):
    """A shard rewritten between two loaders (other offsets: every .json padded by 600 bytes) is
    indexed afresh, and every sample reads back clean in tar order."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    cfg = _config(copy).data
    calls = _counting_read_index(monkeypatch)
    every = lambda: [k for b in build_loader(cfg, "train", rank=0, world_size=1, train=False) for k in b["key"]]  # noqa: E731
    first = every()
    shard = _train_index_files(copy)[0].replace(".idx", ".tar")
    rewrite_shard(copy, shard, lambda name, data: data + b" " * 600 if name.endswith(".json") else data)
    second = every()  # eval mode: a sample read at a stale offset would raise, not be skipped
    assert calls[shard.replace(".tar", ".idx")] == 2
    assert first == second == _tar_keys(copy, _train_index_files(copy))


# ------------------------------------------------------------------ calibration CIs at scale
def _calibration_inputs(n: int, n_boot: int):
    from cxr.evaluation.stats import Resamples

    rng = np.random.default_rng(3)
    y = (rng.random((n, len(LABELS))) < 0.15).astype(np.float64)
    p = np.clip(0.15 + 0.5 * (y - 0.15) + rng.normal(0, 0.15, y.shape), 0.001, 0.999)
    patients = np.repeat(np.arange(n // 3 + 1), 3)[:n]  # three images a patient
    return y, p, Resamples(n, n_boot, seed=1, units=patients)


def test_calibration_bootstrap_equals_a_per_resample_weighted_computation():
    """ECE (both binnings) and Brier of each patient resample equal a direct weighted computation
    on that resample's image weights (bins of the full split, as documented)."""
    from cxr.evaluation import calibration as cal
    from cxr.evaluation.analysis import _calibration_samples

    y, p, resamples = _calibration_inputs(600, 12)
    got = _calibration_samples(y, p, resamples)
    for b in range(resamples.n_boot):
        w = resamples.counts[:, b].astype(np.float64)
        for c in range(len(LABELS)):
            for strategy in ("width", "mass"):
                idx = cal.bin_index(p[:, c], cal.bin_edges(p[:, c], cal.N_BINS, strategy), strategy)
                gap = [np.sum(w[idx == k] * (y[idx == k, c] - p[idx == k, c])) for k in range(cal.N_BINS)]
                assert got[f"ece_{strategy}"][b, c] == pytest.approx(np.abs(gap).sum() / w.sum(), rel=1e-5)
            brier = np.sum(w * (p[:, c] - y[:, c]) ** 2) / w.sum()
            assert got["brier"][b, c] == pytest.approx(brier, rel=1e-5)


def test_calibration_bootstrap_scratch_does_not_grow_with_labels_times_bins():
    """The scratch of the calibration CIs is one label's bins at a time: at 20,000 images and 14
    labels the old all-columns matrix alone took 2·14·15+15 float64 columns (47 MB, twice over)."""
    import tracemalloc

    from cxr.evaluation.analysis import _calibration_samples

    y, p, resamples = _calibration_inputs(20_000, 20)
    tracemalloc.start()
    _calibration_samples(y, p, resamples)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    one_block = 20_000 * 15 * 8  # [n, N_BINS] float64: 2.4 MB
    assert peak < 6 * one_block, f"peak {peak / 1e6:.1f} MB"
