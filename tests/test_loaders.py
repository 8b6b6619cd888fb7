"""Loader contract (cxr.data) on shards written by the real packer.

References are independent of the loader: the splits table (parquet) for keys, labels
and meta; PIL for pixels; tarfile for member offsets; hashlib for the key hash.
Two ranks are simulated by building rank 0 and rank 1 loaders in one process.
"""
from __future__ import annotations

import io

import hashlib
import json
import logging
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from shards.cli import main as shards_main
from shards.errors import CxrError
from shards.labels import LABELS

from cxr.data import DataConfig, build_loader, load_shards_manifest

BACKENDS = ["dali", "wds"]


def _run(argv: list[str]) -> None:
    assert shards_main(argv) == 0, argv


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> dict:
    """Synthetic phantoms (64 px) → official split → packed in many small shards, + derived res32."""
    root = tmp_path_factory.mktemp("synth")
    _run(["synth", "--out", str(root), "--n", "90", "--resolution", "64", "--workers", "1"])
    splits = root / "splits.parquet"
    _run(["split", "--metadata", str(root / "Data_Entry_2017.csv"), "--scheme", "official", "--out", str(splits)])
    out = root / "shards"
    _run(["pack", "--splits", str(splits), "--images", str(root / "images"), "--out", str(out),
          "--shard-size-mb", "0.05", "--workers", "1"])
    _run(["pack", "--splits", str(splits), "--images", str(root / "images"), "--out", str(out),
          "--shard-size-mb", "0.05", "--workers", "1", "--resize", "32"])
    return {"dir": out, "table": _table(splits), "images": root / "images"}


@pytest.fixture(scope="session")
def real(tmp_path_factory, nih_dir: Path, nih_sample_dir: Path) -> dict:
    """The 130 real NIH sample PNGs (1024², 6 of them RGBA) packed with the official split."""
    root = tmp_path_factory.mktemp("real")
    splits = root / "splits.parquet"
    _run(["split", "--metadata", str(nih_dir / "Data_Entry_2017_v2020.csv.gz"), "--scheme", "official",
          "--out", str(splits), "--restrict-to", str(nih_sample_dir)])
    out = root / "shards"
    _run(["pack", "--splits", str(splits), "--images", str(nih_sample_dir), "--out", str(out),
          "--shard-size-mb", "8", "--workers", "1"])
    return {"dir": out, "table": _table(splits), "images": nih_sample_dir}


def _table(path: Path) -> pd.DataFrame:
    table = pd.read_parquet(path)
    table["key"] = table["image"].str.replace(r"\.png$", "", regex=True)
    return table.set_index("key")


def _cfg(shards: Path, backend: str, **kw) -> DataConfig:
    kw.setdefault("resolution", 64)
    kw.setdefault("num_threads", 1)
    return DataConfig(shards=str(shards), backend=backend, **kw)


def _collect(loader) -> list[dict]:
    return [{k: (v.numpy().copy() if hasattr(v, "numpy") else list(v)) for k, v in b.items()} for b in loader]


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ----- config -----

def test_config_rejects_bad_values_naming_field_and_choices():
    with pytest.raises(CxrError, match=r"backend.*dali, wds"):
        DataConfig(backend="tfrecord")
    with pytest.raises(CxrError, match=r"device.*cpu, gpu"):
        DataConfig(device="tpu")
    with pytest.raises(CxrError, match="resolution"):
        DataConfig(resolution=0)
    with pytest.raises(CxrError, match="hflip_p"):
        DataConfig(hflip_p=1.5)
    assert DataConfig(batch_size=8).eval_batch == 8 and DataConfig(eval_batch_size=3).eval_batch == 3


# ----- evaluation: exactly once -----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_eval_two_ranks_every_sample_exactly_once(synth, backend, split):
    expected = set(synth["table"].index[synth["table"]["split"] == split])
    seen: list[str] = []
    for rank in (0, 1):
        loader = build_loader(_cfg(synth["dir"], backend, batch_size=4), split, rank=rank, world_size=2, train=False)
        batches = _collect(loader)
        assert len(batches) == len(loader)
        assert sum(len(b["key"]) for b in batches) == loader.num_samples
        assert all(len(b["key"]) == 4 for b in batches[:-1]) and 1 <= len(batches[-1]["key"]) <= 4
        seen += _keys(batches)
    assert len(seen) == len(set(seen)), "a sample was delivered twice"
    assert set(seen) == expected


def test_eval_partial_last_batch_shape(synth):
    n = int((synth["table"]["split"] == "test").sum())
    loader = build_loader(_cfg(synth["dir"], "dali", batch_size=n - 1), "test")
    sizes = [b["image"].shape[0] for b in loader]
    assert sizes == [n - 1, 1]


# ----- training: shuffle, equal counts, resume -----

@pytest.mark.parametrize("backend", BACKENDS)
def test_train_two_ranks_equal_full_batches_disjoint(synth, backend):
    n = int((synth["table"]["split"] == "train").sum())
    batch = 4
    cfg = _cfg(synth["dir"], backend, batch_size=batch, augment=False)
    per_rank = [_keys(_collect(build_loader(cfg, "train", rank=r, world_size=2, epoch=0))) for r in (0, 1)]
    expected_batches = n // (2 * batch)
    for rank, keys in enumerate(per_rank):
        loader = build_loader(cfg, "train", rank=rank, world_size=2, epoch=0)
        assert len(loader) == expected_batches and loader.num_samples == expected_batches * batch
        assert len(keys) == expected_batches * batch
    assert not set(per_rank[0]) & set(per_rank[1])


def test_train_shuffle_reproducible_and_changes_per_epoch(synth):
    cfg = _cfg(synth["dir"], "wds", batch_size=4, augment=False, num_threads=0)
    train_keys = set(synth["table"].index[synth["table"]["split"] == "train"])
    orders = {e: _keys(_collect(build_loader(cfg, "train", rank=0, world_size=2, epoch=e))) for e in (0, 1, 2)}
    again = _keys(_collect(build_loader(cfg, "train", rank=0, world_size=2, epoch=1)))
    assert again == orders[1]
    assert orders[0] != orders[1] and orders[1] != orders[2]
    other_seed = _keys(_collect(build_loader(_cfg(synth["dir"], "wds", batch_size=4, augment=False, num_threads=0,
                                                  seed=1), "train", rank=0, world_size=2, epoch=1)))
    assert other_seed != orders[1]
    # dropped remainder differs between epochs (both ranks together)
    dropped = []
    for e in (0, 1, 2):
        used = set(orders[e]) | set(_keys(_collect(build_loader(cfg, "train", rank=1, world_size=2, epoch=e))))
        dropped.append(frozenset(train_keys - used))
        assert len(used) == len(train_keys) - len(train_keys) % 8
    assert len(set(dropped)) > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_batches_yields_exact_tail_including_augmentation(synth, backend):
    cfg = _cfg(synth["dir"], backend, batch_size=4, augment=True)
    full = _collect(build_loader(cfg, "train", rank=1, world_size=2, epoch=3))
    tail_loader = build_loader(cfg, "train", rank=1, world_size=2, epoch=3, skip_batches=2)
    tail = _collect(tail_loader)
    assert len(tail_loader) == len(full) - 2 == len(tail)
    for a, b in zip(full[2:], tail):
        assert a["key"] == b["key"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_augmentation_changes_images_and_eval_does_not(synth):
    on = _collect(build_loader(_cfg(synth["dir"], "dali", batch_size=4), "train", epoch=0))
    off = {k: img for b in _collect(build_loader(_cfg(synth["dir"], "dali", batch_size=4, augment=False), "train",
                                                 epoch=0)) for k, img in zip(b["key"], b["image"])}
    diffs = [np.abs(img - off[k]).mean() for b in on for k, img in zip(b["key"], b["image"])]
    assert np.mean(diffs) > 0.05
    ev = _collect(build_loader(_cfg(synth["dir"], "dali", batch_size=4), "train", train=False))
    compared = 0
    for b in ev:
        for k, img in zip(b["key"], b["image"]):
            if k in off:  # training dropped the remainder
                np.testing.assert_array_equal(img, off[k])
                compared += 1
    assert compared == len(off)


# ----- labels, meta and pixels against independent references -----

@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_and_meta_match_splits_table(synth, backend):
    table = synth["table"]
    manifest = json.loads((synth["dir"] / "manifest.json").read_text())
    train_age = table.loc[table["split"] == "train", "age"].astype(float)
    stats = manifest["meta_stats"]
    assert stats["age_mean"] == pytest.approx(train_age.mean(), abs=1e-5)
    assert stats["age_std"] == pytest.approx(train_age.std(ddof=0), abs=1e-5)
    for split in ("train", "val", "test"):
        for b in build_loader(_cfg(synth["dir"], backend, batch_size=8), split, train=False):
            rows = table.loc[b["key"]]
            np.testing.assert_array_equal(b["labels"].numpy(), rows[list(LABELS)].to_numpy(np.float32))
            expect = np.stack([(rows["age"] - stats["age_mean"]) / stats["age_std"],
                               rows["sex"] == "M", rows["sex"] == "F", rows["view"] == "PA", rows["view"] == "AP"],
                              axis=1).astype(np.float32)
            np.testing.assert_allclose(b["meta"].numpy(), expect, atol=1e-5)
            assert b["labels"].dtype == b["meta"].dtype == b["image"].dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_pixels_equal_pil_decode_normalized(real, backend):
    """At 1024 (no resize) both back ends decode the real PNGs bit-exactly, RGBA ones included."""
    cfg = _cfg(real["dir"], backend, resolution=1024, batch_size=4)
    batch = next(iter(build_loader(cfg, "test")))
    assert batch["image"].shape == (4, 1, 1024, 1024)
    for key, img in zip(batch["key"], batch["image"].numpy()):
        ref = np.asarray(PILImage.open(real["images"] / f"{key}.png").convert("L"), np.float32)
        np.testing.assert_allclose(img[0], (ref / 255 - cfg.mean) / cfg.std, atol=1e-5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-augmented"])
def test_backends_agree_on_real_images(real, train):
    """Same keys, labels, meta; pixels within the stated tolerance (resize filters differ).

    Tolerance, in grey levels of 0..255: mean |Δ| ≤ 0.5 and 99th percentile ≤ 2 (DALI's
    antialiased linear resize differs from PIL's bilinear by up to ~20 levels on a few
    high-contrast pixels such as burned-in markers).
    """
    out = {}
    for backend in BACKENDS:
        cfg = _cfg(real["dir"], backend, resolution=256, batch_size=8, augment=True)
        out[backend] = _collect(build_loader(cfg, "test" if not train else "train", train=train, epoch=1))
    assert _keys(out["dali"]) == _keys(out["wds"])
    dali = np.concatenate([b["image"] for b in out["dali"]])
    wds = np.concatenate([b["image"] for b in out["wds"]])
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in out["dali"]]),
                                  np.concatenate([b["labels"] for b in out["wds"]]))
    np.testing.assert_array_equal(np.concatenate([b["meta"] for b in out["dali"]]),
                                  np.concatenate([b["meta"] for b in out["wds"]]))
    grey = np.abs(dali - wds) * cfg.std * 255
    assert grey.mean() <= 0.5 and np.percentile(grey, 99) <= 2.0, (grey.mean(), np.percentile(grey, 99))


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_the_fly_resize_equals_pack_resize(real, backend):
    """Masters resized by the loader give the pixels of `pack --resize` (≤ 1 grey level).

    Reference: shards.image_codec.resize_encoded — the function derive_shard applies to every
    master image — on the grey PNG of each real sample, decoded with PIL.
    """
    from shards.image_codec import resize_encoded

    cfg = _cfg(real["dir"], backend, resolution=224, batch_size=8)
    worst = 0.0
    for batch in _collect(build_loader(cfg, "test", train=False)):
        for key, img in zip(batch["key"], batch["image"]):
            grey = io.BytesIO()
            PILImage.open(real["images"] / f"{key}.png").convert("L").save(grey, format="PNG")
            derived = PILImage.open(io.BytesIO(resize_encoded(grey.getvalue(), 224, "png")))
            ref = np.asarray(derived, np.float32)
            worst = max(worst, float(np.abs((img[0] * cfg.std + cfg.mean) * 255 - ref).max()))
    assert worst <= 1.0, worst


# ----- resolution and derived shards -----

def test_derived_shards_preferred_and_logged(synth, caplog):
    with caplog.at_level(logging.INFO, logger="cxr.data"):
        used, manifest = load_shards_manifest(synth["dir"], 32)
    assert used == synth["dir"] / "res32" and manifest["resolution"] == 32
    assert "res32" in caplog.text
    used, _ = load_shards_manifest(synth["dir"], 48)
    assert used == synth["dir"]
    for backend in BACKENDS:
        batch = next(iter(build_loader(_cfg(synth["dir"], backend, resolution=32, batch_size=3), "test")))
        assert batch["image"].shape == (3, 1, 32, 32)
        key = batch["key"][0]
        # derived pixels are the res32 shard's bytes decoded, not the 64 px master resized by the loader
        with tarfile.open(next((synth["dir"] / "res32").glob("test-000000.tar"))) as tar:
            ref = np.asarray(PILImage.open(tar.extractfile(f"{key}.png")).convert("L"), np.float32)
        np.testing.assert_allclose(batch["image"][0, 0].numpy(), (ref / 255 - DataConfig.mean) / DataConfig.std, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("resolution", [224, 1024])
def test_any_resolution_shape(synth, backend, resolution):
    loader = build_loader(_cfg(synth["dir"], backend, resolution=resolution, batch_size=2), "val", train=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, resolution, resolution) and batch["labels"].shape == (2, 14)
    assert batch["meta"].shape == (2, 5)


# ----- corrupt samples, missing files -----

def _corrupt_copy(src: Path, dst: Path, split: str, fix_crc: bool) -> tuple[str, str]:
    """Copy the shards and damage one image in the middle of a `split` shard; returns (shard, key)."""
    shutil.copytree(src, dst)
    tar_path = sorted(dst.glob(f"{split}-*.tar"))[1]
    with tarfile.open(tar_path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][1]
    data = bytearray(tar_path.read_bytes())
    png = data[member.offset_data: member.offset_data + member.size]
    # first IDAT chunk: flip bytes inside the compressed stream
    pos = png.index(b"IDAT") - 4
    length = int.from_bytes(png[pos:pos + 4], "big")
    for j in range(8, min(length, 40)):
        png[pos + 8 + j] ^= 0xFF
    if fix_crc:  # keep the chunk CRC valid so only the decoder can notice
        crc = zlib.crc32(bytes(png[pos + 4: pos + 8 + length]))
        png[pos + 8 + length: pos + 12 + length] = crc.to_bytes(4, "big")
    data[member.offset_data: member.offset_data + member.size] = png
    tar_path.write_bytes(bytes(data))
    return tar_path.name, member.name.split(".")[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fix_crc", [False, True], ids=["crc-fails", "decode-fails"])
def test_corrupt_sample_train_skipped_eval_raises(synth, tmp_path, backend, fix_crc):
    shard, key = _corrupt_copy(synth["dir"], tmp_path / "s", "train", fix_crc)
    cfg = _cfg(tmp_path / "s", backend, batch_size=4)
    train_keys = set(synth["table"].index[synth["table"]["split"] == "train"])
    # world_size 1 with a batch that divides N keeps every sample, so the corrupt one is in the plan
    n = len(train_keys)
    cfg = _cfg(tmp_path / "s", backend, batch_size=next(b for b in (6, 5, 4, 3, 2, 1) if n % b == 0))
    loader = build_loader(cfg, "train")
    keys = _keys(_collect(loader))
    assert key not in keys and set(keys) == train_keys - {key}
    assert len(keys) == loader.num_samples - 1
    assert loader.report() == {"samples": n - 1, "skipped": 1, "skipped_keys": [key]}
    with pytest.raises(CxrError, match=rf"{shard}.*{key}"):
        _collect(build_loader(_cfg(tmp_path / "s", backend, batch_size=4, strict=True), "train"))
    with pytest.raises(CxrError, match=rf"{shard}.*{key}"):
        _collect(build_loader(_cfg(tmp_path / "s", backend, batch_size=4), "train", train=False))


def test_missing_manifest_and_shard_name_the_path(synth, tmp_path):
    with pytest.raises(CxrError, match=str(tmp_path / "nowhere" / "manifest.json")):
        build_loader(_cfg(tmp_path / "nowhere", "dali"), "train")
    shutil.copytree(synth["dir"], tmp_path / "s")
    (tmp_path / "s" / "val-000000.tar").unlink()
    with pytest.raises(CxrError, match=str(tmp_path / "s" / "val-000000.tar")):
        build_loader(_cfg(tmp_path / "s", "wds"), "val")
    with pytest.raises(CxrError, match="no shards for split 'nosuch'"):
        build_loader(_cfg(tmp_path / "s", "wds"), "nosuch")


def test_missing_index_falls_back_to_tar_scan(synth, tmp_path):
    shutil.copytree(synth["dir"], tmp_path / "s")
    for idx in (tmp_path / "s").glob("test-*.idx"):
        idx.unlink()
    keys = _keys(_collect(build_loader(_cfg(tmp_path / "s", "dali", batch_size=4), "test")))
    assert set(keys) == set(synth["table"].index[synth["table"]["split"] == "test"])


def test_gpu_device_is_a_switch_with_a_clear_error_without_cuda(synth):
    loader = build_loader(_cfg(synth["dir"], "dali", device="gpu", batch_size=4), "test")
    with pytest.raises(CxrError, match="device=gpu"):
        next(iter(loader))


# ----- CLI -----

def test_inspect_cli_counts_and_key_hash(synth, tmp_path, capsys):
    from cxr.data.__main__ import main

    grid = tmp_path / "grid.png"
    assert main(["inspect", "--shards", str(synth["dir"]), "--split", "test", "--backend", "wds",
                 "--resolution", "64", "--batch-size", "4", "--world-size", "1", "--json",
                 "--save-grid", str(grid), "--num-threads", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = sorted(synth["table"].index[synth["table"]["split"] == "test"])
    assert out["samples"] == out["unique_keys"] == len(keys)
    assert out["keys_sha256"] == hashlib.sha256("\n".join(keys).encode()).hexdigest()
    assert PILImage.open(grid).size[0] > 200
    assert main(["inspect", "--shards", str(tmp_path / "none"), "--split", "test"]) == 2

