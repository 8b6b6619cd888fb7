"""Loader contract (cxr.data) on shards written by the real packer.

References are independent of the loader: the splits table (parquet) for keys, labels
and meta; PIL for pixels; tarfile for member offsets; hashlib for the key hash.
Two ranks are simulated by building rank 0 and rank 1 loaders in one process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from cxr.data import DataConfig, build_loader, load_shards_manifest, to_device
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS
from shards.cli import main as shards_main

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

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
    _run(
        [
            "pack",
            "--splits",
            str(splits),
            "--images",
            str(root / "images"),
            "--out",
            str(out),
            "--shard-size-mb",
            "0.05",
            "--workers",
            "1",
        ]
    )
    _run(
        [
            "pack",
            "--splits",
            str(splits),
            "--images",
            str(root / "images"),
            "--out",
            str(out),
            "--shard-size-mb",
            "0.05",
            "--workers",
            "1",
            "--resize",
            "32",
        ]
    )
    return {"dir": out, "table": _table(splits), "images": root / "images"}


@pytest.fixture(scope="session")
def real(tmp_path_factory, nih_dir: Path, nih_sample_dir: Path) -> dict:
    """The 130 real NIH sample PNGs (1024², 6 of them RGBA) packed with the official split."""
    root = tmp_path_factory.mktemp("real")
    splits = root / "splits.parquet"
    _run(
        [
            "split",
            "--metadata",
            str(nih_dir / "Data_Entry_2017_v2020.csv.gz"),
            "--scheme",
            "official",
            "--out",
            str(splits),
            "--restrict-to",
            str(nih_sample_dir),
        ]
    )
    out = root / "shards"
    _run(
        [
            "pack",
            "--splits",
            str(splits),
            "--images",
            str(nih_sample_dir),
            "--out",
            str(out),
            "--shard-size-mb",
            "8",
            "--workers",
            "1",
        ]
    )
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
    """Each batch as numpy: "image" the model's input (cxr.data.to_device on the CPU), "pixels" the uint8 handed over."""
    out = []
    for b in loader:
        row = {k: (v.numpy().copy() if hasattr(v, "numpy") else list(v)) for k, v in b.items()}
        row["pixels"], row["image"] = row["image"], to_device(b, "cpu").numpy()
        out.append(row)
    return out


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
    other_seed = _keys(
        _collect(
            build_loader(
                _cfg(synth["dir"], "wds", batch_size=4, augment=False, num_threads=0, seed=1),
                "train",
                rank=0,
                world_size=2,
                epoch=1,
            )
        )
    )
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
    off = {
        k: img
        for b in _collect(build_loader(_cfg(synth["dir"], "dali", batch_size=4, augment=False), "train", epoch=0))
        for k, img in zip(b["key"], b["image"])
    }
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
    import torch

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
            expect = np.stack(
                [
                    (rows["age"] - stats["age_mean"]) / stats["age_std"],
                    rows["sex"] == "M",
                    rows["sex"] == "F",
                    rows["view"] == "PA",
                    rows["view"] == "AP",
                ],
                axis=1,
            ).astype(np.float32)
            np.testing.assert_allclose(b["meta"].numpy(), expect, atol=1e-5)
            assert b["labels"].dtype == b["meta"].dtype == torch.float32 and b["image"].dtype == torch.uint8


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_pixels_equal_pil_decode_normalized(real, backend):
    """At 1024 (no resize) both back ends decode the real PNGs bit-exactly, RGBA ones included."""
    cfg = _cfg(real["dir"], backend, resolution=1024, batch_size=4)
    batch = next(iter(build_loader(cfg, "test")))
    assert batch["image"].shape == (4, 1, 1024, 1024)
    for key, img in zip(batch["key"], to_device(batch, "cpu").numpy()):
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
    np.testing.assert_array_equal(
        np.concatenate([b["labels"] for b in out["dali"]]), np.concatenate([b["labels"] for b in out["wds"]])
    )
    np.testing.assert_array_equal(
        np.concatenate([b["meta"] for b in out["dali"]]), np.concatenate([b["meta"] for b in out["wds"]])
    )
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
        np.testing.assert_allclose(
            to_device(batch, "cpu")[0, 0].numpy(), (ref / 255 - DataConfig.mean) / DataConfig.std, atol=1e-5
        )


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
    png = data[member.offset_data : member.offset_data + member.size]
    # first IDAT chunk: flip bytes inside the compressed stream
    pos = png.index(b"IDAT") - 4
    length = int.from_bytes(png[pos : pos + 4], "big")
    for j in range(8, min(length, 40)):
        png[pos + 8 + j] ^= 0xFF
    if fix_crc:  # keep the chunk CRC valid so only the decoder can notice
        crc = zlib.crc32(bytes(png[pos + 4 : pos + 8 + length]))
        png[pos + 8 + length : pos + 12 + length] = crc.to_bytes(4, "big")
    data[member.offset_data : member.offset_data + member.size] = png
    tar_path.write_bytes(bytes(data))
    return tar_path.name, member.name.split(".")[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fix_crc", [False, True], ids=["crc-fails", "decode-fails"])
@pytest.mark.parametrize("resolution", [64, 48], ids=["native", "resized"])  # 48: the masters resized on the fly
def test_corrupt_sample_train_skipped_eval_raises(synth, tmp_path, backend, fix_crc, resolution):
    shard, key = _corrupt_copy(synth["dir"], tmp_path / "s", "train", fix_crc)
    train_keys = set(synth["table"].index[synth["table"]["split"] == "train"])
    # world_size 1 with a batch that divides N keeps every sample, so the corrupt one is in the plan
    n = len(train_keys)
    cfg = _cfg(
        tmp_path / "s",
        backend,
        batch_size=next(b for b in (6, 5, 4, 3, 2, 1) if n % b == 0),
        resolution=resolution,
        num_threads=2,
    )
    loader = build_loader(cfg, "train")
    keys = _keys(_collect(loader))
    assert key not in keys and set(keys) == train_keys - {key}
    assert len(keys) == loader.num_samples - 1
    assert loader.report() == {"samples": n - 1, "skipped": 1, "skipped_keys": [key]}
    with pytest.raises(CxrError, match=rf"{shard}.*{key}"):
        _collect(build_loader(_cfg(tmp_path / "s", backend, batch_size=4, strict=True, resolution=resolution), "train"))
    with pytest.raises(CxrError, match=rf"{shard}.*{key}"):
        _collect(build_loader(_cfg(tmp_path / "s", backend, batch_size=4, resolution=resolution), "train", train=False))


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
    assert (
        main(
            [
                "inspect",
                "--shards",
                str(synth["dir"]),
                "--split",
                "test",
                "--backend",
                "wds",
                "--resolution",
                "64",
                "--batch-size",
                "4",
                "--world-size",
                "1",
                "--json",
                "--save-grid",
                str(grid),
                "--num-threads",
                "0",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = sorted(synth["table"].index[synth["table"]["split"] == "test"])
    assert out["samples"] == out["unique_keys"] == len(keys)
    assert out["keys_sha256"] == hashlib.sha256("\n".join(keys).encode()).hexdigest()
    assert PILImage.open(grid).size[0] > 200
    assert main(["inspect", "--shards", str(tmp_path / "none"), "--split", "test"]) == 2


def test_dali_pipeline_built_once_per_split_across_epochs(synth, monkeypatch):
    from cxr.data import dali_feed

    built = []
    original = dali_feed._pipeline
    monkeypatch.setattr(dali_feed, "_pipeline", lambda o, source: built.append(o.augment) or original(o, source))
    monkeypatch.setattr(dali_feed, "_BUILT", dali_feed.OrderedDict())
    cfg = _cfg(synth["dir"], "dali", batch_size=4, augment=True)
    runs = {}
    for epoch in (0, 1):
        runs[("train", epoch)] = _collect(build_loader(cfg, "train", epoch=epoch))
        runs[("val", epoch)] = _collect(build_loader(cfg, "val", epoch=0, train=False))
    assert built == [True, False], "one train and one val pipeline for two epochs"
    # an epoch left early (max_steps, a break) drops its pipeline: the next epoch is built afresh
    next(iter(build_loader(cfg, "train", epoch=2)))
    full = _collect(build_loader(cfg, "train", epoch=2))
    assert built == [True, False, True]
    # reference: every epoch on a newly built pipeline (empty cache) gives the same batches
    for (split, epoch), batches in runs.items():
        dali_feed._BUILT.clear()
        fresh = _collect(build_loader(cfg, split, epoch=epoch, train=split == "train"))
        assert _keys(fresh) == _keys(batches)
        for a, b in zip(fresh, batches):
            np.testing.assert_array_equal(a["image"], b["image"])
    # the epoch after the early exit is exact (no stale prefetched batch leaked into it)
    dali_feed._BUILT.clear()
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in full]),
        np.concatenate([b["image"] for b in _collect(build_loader(cfg, "train", epoch=2))]),
    )


def test_dali_device_id_is_the_local_rank(monkeypatch):
    from cxr.data.dali_loader import local_device_id

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_device_id() == 1  # RANK may be 9 on the second node; the GPU index is the local one
    monkeypatch.delenv("LOCAL_RANK")
    assert local_device_id() == 3
    monkeypatch.delenv("SLURM_LOCALID")
    assert local_device_id() == 0  # no GPU here: torch's current device would be used on one


def test_pin_memory_auto_follows_cuda_and_cpu_default_is_off(synth, monkeypatch):
    import torch

    from cxr.config import config_hash, load_config

    cfg = load_config(None, [])
    assert cfg.data.pin_memory == "auto" and cfg.data.pinned is torch.cuda.is_available()
    assert load_config(None, ["data.pin_memory=true"]).data.pinned is True
    assert load_config(None, ["data.pin_memory=false"]).data.pinned is False
    with pytest.raises(CxrError, match="data.pin_memory"):
        load_config(None, ["data.pin_memory=maybe"])
    # pinning changes no trained value: old runs' config hash (and so their resume) is kept
    assert config_hash(load_config(None, ["data.pin_memory=true"])) == config_hash(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert DataConfig().pinned is True  # auto on a CUDA machine
    monkeypatch.undo()
    if not torch.cuda.is_available():  # this machine: the default leaves CPU batches unpinned
        for backend in BACKENDS:
            batch = next(iter(build_loader(_cfg(synth["dir"], backend, batch_size=4), "val", train=False)))
            assert not batch["image"].is_pinned()


# ----- per-sample checksums (format cxr-shards/2), old shards, wrong indexes -----


def _member(tar_path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(tar_path) as tar:
        return tar.getmember(name)


def _edit_in_place(tar_path: Path, name: str, change) -> None:
    """Replace member `name`'s bytes by change(bytes) of the same length (headers and .idx stay valid)."""
    info = _member(tar_path, name)
    data = bytearray(tar_path.read_bytes())
    new = change(bytes(data[info.offset_data : info.offset_data + info.size]))
    assert len(new) == info.size
    data[info.offset_data : info.offset_data + info.size] = new
    tar_path.write_bytes(bytes(data))


def _train_and_eval_see_one_corrupt(shards: Path, backend: str, key: str, shard: str, n: int) -> None:
    batch = next(b for b in (6, 5, 4, 3, 2, 1) if n % b == 0)  # keeps every sample in the plan
    loader = build_loader(_cfg(shards, backend, batch_size=batch), "train")
    keys = _keys(_collect(loader))
    assert key not in keys and len(keys) == n - 1
    assert loader.report() == {"samples": n - 1, "skipped": 1, "skipped_keys": [key]}
    with pytest.raises(CxrError, match=rf"{shard}: sample {key} is corrupt \(.*checksum mismatch"):
        _collect(build_loader(_cfg(shards, backend, batch_size=4), "train", train=False))


@pytest.fixture(scope="session")
def synth_jpeg(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_jpeg") / "shards"
    _run(
        [
            "pack",
            "--splits",
            str(synth["dir"].parent / "splits.parquet"),
            "--images",
            str(synth["images"]),
            "--out",
            str(out),
            "--codec",
            "jpeg",
            "--shard-size-mb",
            "0.05",
            "--workers",
            "1",
        ]
    )
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg_with_flipped_entropy_bytes_is_skipped_in_train_and_raises_in_eval(synth, synth_jpeg, tmp_path, backend):
    """Battery 4.10: DALI used to decode such a JPEG silently (wrong pixels, nothing skipped)."""
    shards = tmp_path / "s"
    shutil.copytree(synth_jpeg, shards)
    tar_path = sorted(shards.glob("train-*.tar"))[1]
    with tarfile.open(tar_path) as tar:
        name = [m.name for m in tar.getmembers() if m.name.endswith(".jpg")][0]

    def flip(jpg: bytes) -> bytes:
        start = jpg.index(b"\xff\xda") + 2 + int.from_bytes(jpg[jpg.index(b"\xff\xda") + 2 :][:2], "big")
        mid = start + (len(jpg) - 2 - start) // 2
        return jpg[:mid] + bytes(b ^ 0x01 for b in jpg[mid : mid + 40]) + jpg[mid + 40 :]

    _edit_in_place(tar_path, name, flip)
    n = int((synth["table"]["split"] == "train").sum())
    _train_and_eval_see_one_corrupt(shards, backend, name.split(".")[0], tar_path.name, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_byte_flipped_to_a_valid_value_is_caught(synth, tmp_path, backend):
    """Battery 4.6: a .labels byte 0→1 is still 0/1, so only the checksum can tell."""
    shards = tmp_path / "s"
    shutil.copytree(synth["dir"], shards)
    tar_path = sorted(shards.glob("train-*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        name = [m.name for m in tar.getmembers() if m.name.endswith(".labels")][2]
    _edit_in_place(tar_path, name, lambda b: bytes([1 - b[0]]) + b[1:])
    n = int((synth["table"]["split"] == "train").sum())
    _train_and_eval_see_one_corrupt(shards, backend, name.split(".")[0], tar_path.name, n)


def test_checksums_are_crc32_of_the_members_also_in_derived_shards(synth):
    for folder in (synth["dir"], synth["dir"] / "res32"):
        assert json.loads((folder / "manifest.json").read_text())["format"] == "cxr-shards/2"
        with tarfile.open(sorted(folder.glob("val-*.tar"))[0]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                crc = json.loads(data)["crc32"]
                assert crc == {ext: zlib.crc32(members[f"{key}.{ext}"]) for ext in ("png", "labels", "meta", "id")}
    assert shards_main(["verify", str(synth["dir"] / "res32"), "--workers", "1"]) == 0


def _as_format_1(src: Path, dst: Path) -> None:
    """A cxr-shards/1 copy: .json without crc32 (as packed before checksums), manifest format /1."""
    from shards.dali_index import index_for_tar

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("res*"))
    manifest = json.loads((dst / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = dst / entry["name"]
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for info, data in members:
                if info.name.endswith(".json"):
                    record = json.loads(data)
                    del record["crc32"]
                    data = json.dumps(record, separators=(",", ":")).encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (dst / entry["index"]).write_text(index_for_tar(path))
        entry["bytes"], entry["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["format"] = "cxr-shards/1"
    (dst / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_1_shards_without_checksums_still_load(synth, tmp_path, backend):
    _as_format_1(synth["dir"], tmp_path / "v1")
    assert shards_main(["verify", str(tmp_path / "v1"), "--workers", "1"]) == 0
    table = synth["table"]
    for b in build_loader(_cfg(tmp_path / "v1", backend, batch_size=8), "val", train=False):
        np.testing.assert_array_equal(b["labels"].numpy(), table.loc[b["key"]][list(LABELS)].to_numpy(np.float32))
    assert sorted(
        _keys(_collect(build_loader(_cfg(tmp_path / "v1", backend, batch_size=8), "val", train=False)))
    ) == sorted(table.index[table["split"] == "val"])


def _shift_index(idx: Path, by: int, lines: slice = slice(1, None)) -> None:
    """Add `by` to every data offset of the index lines selected (battery 4.7 shifted all by 512)."""
    text = idx.read_text().splitlines()
    for j in range(len(text))[lines]:
        tok = text[j].split()
        text[j] = " ".join(str(int(t) + by) if k % 4 == 1 else t for k, t in enumerate(tok))
    idx.write_text("\n".join(text) + "\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_index_is_rebuilt_with_a_warning_and_nothing_skipped(synth, tmp_path, backend, caplog):
    shards = tmp_path / "s"
    shutil.copytree(synth["dir"], shards)
    idx = sorted(shards.glob("train-*.idx"))[1]
    _shift_index(idx, 512)
    n = int((synth["table"]["split"] == "train").sum())
    batch = next(b for b in (6, 5, 4, 3, 2, 1) if n % b == 0)
    with caplog.at_level(logging.WARNING, logger="cxr.data"):
        loader = build_loader(_cfg(shards, backend, batch_size=batch), "train")
        keys = _keys(_collect(loader))
    assert sorted(keys) == sorted(synth["table"].index[synth["table"]["split"] == "train"])
    assert loader.report()["skipped"] == 0
    assert f"{idx} does not match {idx.with_suffix('.tar').name}" in caplog.text and "rebuilding" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_wrong_in_the_middle_is_named_not_reported_as_corrupt(synth, tmp_path, backend):
    shards = tmp_path / "s"
    shutil.copytree(synth["dir"], shards)
    idx = max(shards.glob("train-*.idx"), key=lambda p: len(p.read_text().splitlines()))
    assert len(idx.read_text().splitlines()) >= 4  # a middle sample that the open-time check does not look at
    _shift_index(idx, 512, slice(2, 3))
    n = int((synth["table"]["split"] == "train").sum())
    batch = next(b for b in (6, 5, 4, 3, 2, 1) if n % b == 0)
    with pytest.raises(CxrError, match=rf"{idx}: index does not match .*delete the .idx"):
        _collect(build_loader(_cfg(shards, backend, batch_size=batch), "train"))


def test_format_1_png_check_catches_every_flipped_or_missing_byte():
    """The loaders' pre-decode PNG check (format /1) is pack's check_png: a PNG written by PIL
    passes; flipping any one byte (CRC-32 detects every burst of ≤ 32 bits in a chunk's type and
    data; a damaged length or CRC field cannot match either) or cutting the file short fails."""
    from cxr.data.shard_index import image_problem

    buf = io.BytesIO()
    PILImage.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(buf, format="PNG")
    png = buf.getvalue()
    assert image_problem(png, "png") is None
    for pos in range(len(png)):
        flipped = bytearray(png)
        flipped[pos] ^= 0xFF
        assert image_problem(bytes(flipped), "png") is not None, pos
    for end in range(len(png)):
        assert image_problem(png[:end], "png") is not None, end


def test_index_read_and_tar_scan_agree_with_tarfile(synth):
    """Both ways the loaders learn member offsets — the .idx pack wrote and the header scan
    used without one — equal what the standard library's tarfile reports for every shard."""
    from shards.dali_index import read_index, scan_tar

    tars = sorted(synth["dir"].glob("*.tar")) + sorted(synth["dir"].glob("res*/*.tar"))
    assert tars
    for tar in tars:
        expected: list[tuple[str, dict]] = []
        with tarfile.open(tar) as archive:
            for m in archive.getmembers():
                key, ext = m.name.split(".", 1)
                if not expected or expected[-1][0] != key:
                    expected.append((key, {}))
                expected[-1][1][ext] = (m.offset_data, m.size)
        assert read_index(tar.with_suffix(".idx")) == expected, tar
        assert scan_tar(tar) == expected, tar


# ----- DALI parallel external source (data.source_workers) -----


def _assert_same_batches(serial: list[dict], parallel: list[dict]) -> None:
    assert [b["key"] for b in parallel] == [b["key"] for b in serial]
    for a, b in zip(serial, parallel):
        for field in ("image", "labels", "meta"):
            np.testing.assert_array_equal(a[field], b[field])


@pytest.mark.parametrize("case", ["train-augment-rank1-resume", "eval-partial-last", "resize-masters-augment"])
def test_dali_parallel_source_yields_the_serial_batches(synth, case):
    """The serial source (source_workers=0) is the reference: same keys, order, labels, meta and pixels."""
    train = case != "eval-partial-last"
    kw = dict(batch_size=4, augment=True, resolution=48 if case.startswith("resize") else 64)
    where = dict(rank=1, world_size=2, epoch=3, skip_batches=1) if case.startswith("train") else {}
    split = "train" if train else "val"
    serial = _collect(build_loader(_cfg(synth["dir"], "dali", **kw), split, train=train, **where))
    workers = 2 if train else 1
    parallel = _collect(
        build_loader(_cfg(synth["dir"], "dali", source_workers=workers, **kw), split, train=train, **where)
    )
    assert serial and len({len(b["key"]) for b in serial}) == (1 if train else 2)  # eval: a shorter last batch
    _assert_same_batches(serial, parallel)


@pytest.mark.parametrize("fix_crc", [False, True], ids=["crc-fails", "decode-fails"])
def test_dali_parallel_source_skips_and_raises_like_serial(synth, tmp_path, fix_crc):
    shard, key = _corrupt_copy(synth["dir"], tmp_path / "s", "train", fix_crc)
    n = int((synth["table"]["split"] == "train").sum())
    batch = next(b for b in (6, 5, 4, 3, 2, 1) if n % b == 0)  # keeps every sample in the plan
    runs = {}
    for workers in (0, 2):
        loader = build_loader(_cfg(tmp_path / "s", "dali", batch_size=batch, source_workers=workers), "train")
        runs[workers] = (_collect(loader), loader.report())
    assert runs[2][1] == runs[0][1] == {"samples": n - 1, "skipped": 1, "skipped_keys": [key]}
    _assert_same_batches(runs[0][0], runs[2][0])
    with pytest.raises(CxrError, match=rf"{shard}.*{key}"):
        _collect(build_loader(_cfg(tmp_path / "s", "dali", batch_size=4, source_workers=1), "train", train=False))


def test_dali_parallel_source_batch_of_only_corrupt_samples_stops(synth, tmp_path):
    shard, key = _corrupt_copy(synth["dir"], tmp_path / "s", "train", fix_crc=False)
    for workers in (0, 1):
        with pytest.raises(CxrError, match=rf"{shard}: every sample of a batch is corrupt \(\['{key}'\]\)"):
            _collect(build_loader(_cfg(tmp_path / "s", "dali", batch_size=1, source_workers=workers), "train"))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_reordered_manifest_labels_list_is_refused_when_a_split_is_opened(synth, tmp_path, split):
    """Battery 2, 7.6: labels[0] and labels[1] swapped in manifest.json trained (and evaluated) every
    head under the other's name. Reference: the splits table says which samples are positive for the
    two labels, and the packed order is cxrbase.labels.LABELS."""
    table = synth["table"]
    assert table[table["split"] == split][[LABELS[0], LABELS[1]]].to_numpy().any()  # the swap is visible
    shutil.copytree(synth["dir"], tmp_path / "s")
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["labels"] == list(LABELS)
    manifest["labels"][0], manifest["labels"][1] = manifest["labels"][1], manifest["labels"][0]
    path.write_text(json.dumps(manifest))
    for backend in BACKENDS:
        with pytest.raises(CxrError) as err:
            build_loader(_cfg(tmp_path / "s", backend, batch_size=4), split)
        msg = str(err.value)
        assert msg.startswith(f"{path}: its labels list is not the order the samples were packed in")
        assert f"restore its labels list to {list(LABELS)}" in msg and "re-pack" in msg and "\n" not in msg
    manifest["labels"] = list(LABELS)  # put back: it opens again (the check is not sticky)
    path.write_text(json.dumps(manifest))
    assert len(build_loader(_cfg(tmp_path / "s", "wds", batch_size=4), split)) > 0


# ----- a shard cut while a loader is reading it (battery 2, 7.2) -----


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_truncated_after_a_read_keeps_that_read_and_skips_the_rest_naming_the_shard(
    synth, tmp_path, backend, monkeypatch, caplog
):
    """The shard is cut (at the start of the sample just read) right after the loader read a sample
    of it: that sample's labels/meta are those read with its image; every later sample of the shard
    is a counted corrupt sample naming the shard. The old loader re-read .labels for the batch and
    stacked a 0-byte read with 14-byte ones (ValueError: all input arrays must have the same shape)."""
    from cxr.data import shard_index

    shutil.copytree(synth["dir"], tmp_path / "s")
    tar_path = sorted((tmp_path / "s").glob("train-*.tar"))[1]
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    in_shard = {m.name.split(".")[0] for m in members}
    victim = [m for m in members if m.name.endswith(".png")][2]  # the shard's third sample
    cut = victim.offset  # at its image's tar header: its own bytes and every later sample are lost
    real_read, state = shard_index.SampleReader.read, {"cut": False}

    def read_then_cut(self, i, check_image=True):
        out = real_read(self, i, check_image)
        if not state["cut"] and self.index.keys[i] == victim.name.split(".")[0]:
            os.truncate(tar_path, cut)  # the bytes of this sample were read whole, before the cut
            state["cut"] = True
        return out

    monkeypatch.setattr(shard_index.SampleReader, "read", read_then_cut)
    table = synth["table"]
    train_keys = set(table.index[table["split"] == "train"])
    n = len(train_keys)
    batch = next(b for b in (6, 5, 4, 3, 2) if n % b == 0)  # every sample in the plan
    cfg = _cfg(tmp_path / "s", backend, batch_size=batch, num_threads=0 if backend == "wds" else 1)
    loader = build_loader(cfg, "train")
    with caplog.at_level(logging.WARNING, logger="cxr.data"):
        batches = _collect(loader)
    assert state["cut"]
    keys = _keys(batches)
    report = loader.report()
    skipped = set(report["skipped_keys"])
    assert report["skipped"] == len(skipped) >= 1 and skipped <= in_shard - {victim.name.split(".")[0]}
    assert set(keys) == train_keys - skipped and len(keys) == n - len(skipped)
    for b in batches:  # the truth of every yielded sample: the splits table
        np.testing.assert_array_equal(b["labels"], table.loc[b["key"], list(LABELS)].to_numpy(np.float32))
    msgs = [r.getMessage() for r in caplog.records if "skipping corrupt sample" in r.getMessage()]
    assert len(msgs) == len(skipped) and all(str(tar_path) in m and "truncated" in m for m in msgs)
    # evaluation stops at the first sample past the cut, naming the shard and the fault
    with pytest.raises(CxrError, match=rf"{tar_path}: sample \S+ is corrupt \(\.png truncated"):
        _collect(build_loader(cfg, "train", train=False))


def test_full_resolution_masters_are_not_said_to_be_resized(real, capsys):
    """The NIH masters are 1024² (PIL says so of every sample file): a run or `cxr-data inspect` at
    1024 reads them as they are, and says so; at 256 they are resized with pack's filter."""
    from cxr.data import image_source
    from cxr.data.__main__ import main

    assert {PILImage.open(p).size for p in real["images"].glob("*.png")} == {(1024, 1024)}
    native = image_source(real["dir"], 1024)
    assert native == {"source": f"masters {real['dir']} at their native 1024 px", "resize_filter": None}
    assert "resized on the fly to 256 px" in image_source(real["dir"], 256)["source"]
    assert (
        main(
            [
                "inspect",
                "--shards",
                str(real["dir"]),
                "--split",
                "test",
                "--backend",
                "wds",
                "--resolution",
                "1024",
                "--batch-size",
                "2",
                "--limit",
                "1",
                "--num-threads",
                "0",
            ]
        )
        == 0
    )
    assert (
        capsys.readouterr().out.strip().splitlines()[-1]
        == f"images: masters {real['dir']} at their native 1024 px; resize filter: None"
    )


def _spawned_children() -> dict[int, bytes]:
    """pid → command line of this process's children started by multiprocessing's spawn (DALI's source
    workers, multiprocessing's resource tracker)."""
    out = {}
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in map(int, (task / "children").read_text().split()):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"multiprocessing" in cmdline:
                out[pid] = cmdline
    return out


def _pending_signals(pid: int) -> int:
    """Signals pending for process pid (process-wide | main thread), as the bit mask of /proc/PID/status."""
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
    )
    assert not status["State"].startswith(("Z", "X")), f"worker {pid} died: {status['State']}"
    return int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker processes from /proc (Linux)")
def test_dali_source_workers_survive_the_jobs_stop_signals(synth):
    """Issue 22 item 7: srun / scancel --signal send SIGUSR1 / SIGTERM to every process of the job.

    The source workers (spawned by DALI) must leave the stop to the training process: both
    signals stay pending (blocked) in every worker and the epoch goes on to its end — with
    the default action the workers died and the loader failed.
    """
    before = set(_spawned_children())
    loader = build_loader(_cfg(synth["dir"], "dali", batch_size=2, source_workers=1), "train")
    batches = iter(loader)
    keys = list(next(batches)["key"])  # the pipeline is built: its worker is running
    workers = {pid: cmd for pid, cmd in _spawned_children().items() if pid not in before}
    assert any(b"spawn_main" in cmd for cmd in workers.values()), workers
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGTERM)
    stop = (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGTERM - 1))
    for pid in workers:  # the kernel marks a blocked signal pending at once; a default action kills instead
        assert _pending_signals(pid) & stop == stop
    keys += [k for b in batches for k in b["key"]]
    assert len(keys) == loader.num_samples


# ----- GPU decoding: silent failures, decoder buffers, DALI's memory (issue 22 items 6 and D) -----


def test_flat_image_from_the_decoder_whose_bytes_hold_pixels_stops_the_run(synth, tmp_path, monkeypatch):
    """nvJPEG's lossless path returned all-zero images before 13.0.2; here the decode is replaced by
    one that zeroes its output, as that bug did. The CPU decode of the checked bytes is the reference."""
    from nvidia.dali import fn, types

    from cxr.data import dali_pipeline

    shutil.copytree(synth["dir"], tmp_path / "s")  # a new shard path: a pipeline of its own, not a cached one
    monkeypatch.setattr(
        dali_pipeline,
        "_decode",
        lambda data, gpu, native: fn.cast(
            fn.decoders.image(data, device="cpu", output_type=types.GRAY) * 0, dtype=types.UINT8
        ),
    )
    loader = build_loader(_cfg(tmp_path / "s", "dali", batch_size=4), "val", train=False)
    first = loader.index.keys[loader.plan.batches[0][0]]
    with pytest.raises(CxrError, match=rf"val-\d+\.tar: sample {first} came out of DALI .* one flat value.*13\.0\.2"):
        next(iter(loader))


def test_decode_off_the_gpu_is_said_once(synth, monkeypatch, caplog):
    from cxr.data import dali_loader

    monkeypatch.setattr(dali_loader, "_NOT_ON_GPU_SAID", set())
    with caplog.at_level(logging.WARNING, logger="cxr.data"):
        for _ in range(3):
            dali_loader._warn_if_not_on_gpu(b"not an image", "ljpeg", 0)
    said = [r for r in caplog.records if "decode on the CPU inside DALI mixed" in r.getMessage()]
    assert len(said) == 1 and "ljpeg" in said[0].getMessage()
    # no GPU here: nvImageCodec's GPU-only backends refuse even a valid stream, and say why
    png = next((synth["dir"]).glob("val-*.tar"))
    with tarfile.open(png) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        data = tar.extractfile(member).read()
    assert dali_loader.gpu_decode_refusal(data) is not None


def test_mixed_decoder_buffers_are_sized_for_grey_masters(monkeypatch):
    """DALI's defaults (16 MiB device, 2 × 8 MiB pinned per thread) are for 4k colour photos; a 1024²
    grey image is 1 MiB (2 MiB as the uint16 of lossless JPEG)."""
    from nvidia.dali import fn

    from cxr.data import dali_pipeline

    seen = {}
    monkeypatch.setattr(fn.decoders, "image", lambda data, **kw: seen.update(kw))
    dali_pipeline._decode(None, True, (1024, 1024))
    assert seen["device"] == "mixed"
    assert seen["device_memory_padding"] == seen["device_memory_padding_jpeg2k"] == 2 * 1024 * 1024
    assert seen["host_memory_padding"] == seen["host_memory_padding_jpeg2k"] == 1024 * 1024


def test_dali_memory_estimate_g5_profile():
    """Hand computation for the g5 profile (16 DALI threads), 1024² PNG / lossless JPEG, batch 16, augmentation on."""
    from cxr.data.dali_pipeline import dali_memory_estimate

    mib = 1 << 20
    cfg = DataConfig(device="gpu", num_threads=16, batch_size=16, resolution=1024, augment=True)
    png = dali_memory_estimate(cfg, "png", (1024, 1024), pipelines=2)
    # per pipeline: 16 threads × 2 MiB decoder buffers; stages 2 deep × 16 images × (1 MiB decoded + 1 MiB warped
    # + 3 float32 stages × 4 MiB) = 448 MiB; pinned 2 × 16 × 1 MiB; two pipelines (train + val)
    assert png["threads"] == 16
    assert png["device"] == 2 * (16 * 2 * mib + 448 * mib) and png["pinned"] == 2 * 32 * mib
    ljpeg = dali_memory_estimate(cfg, "ljpeg", (1024, 1024), pipelines=2)
    assert ljpeg["threads"] == 4 and ljpeg["device"] == 2 * (4 * 2 * mib + 448 * mib)  # GPU decodes: 4 CPU threads
    cpu = dali_memory_estimate(DataConfig(device="cpu", pin_memory=True, batch_size=16, resolution=1024), pipelines=1)
    assert cpu["device"] == 0 and cpu["pinned"] == 2 * 16 * mib  # uint8 handed over: 1 byte per pixel
