"""`pack --codec ljpeg` (lossless JPEG) on real NIH images: pack → verify → load, pixel-exact.

The reference is PIL's decode of the original PNGs (RGBA ones converted to L, as
SPEC says R=G=B), never the shards' own output. 12 real images (the sample's 6
RGBA ones and 6 grey ones) keep it fast. The per-sample crc32 checksum test comes
with the checksum work; here a truncated member is caught by the marker check and
the decoders.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import rewrite_shard
from PIL import Image

from cxr.data import DataConfig, build_loader
from cxrbase.errors import CxrError
from shards.cli import main as shards_main
from shards.verify import verify

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

imagecodecs = pytest.importorskip("imagecodecs")
BACKENDS = ["dali", "wds"]


def _run(argv: list[str]) -> None:
    assert shards_main(argv) == 0, argv


def _reference(images: Path, key: str, size: int | None = None) -> np.ndarray:
    im = Image.open(images / f"{key}.png").convert("L")
    if size is not None:
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im)


@pytest.fixture(scope="module")
def packed(nih_dir, nih_sample_dir, tmp_path_factory) -> dict:
    """12 real images (6 RGBA, 6 L) → official split → ljpeg shards + derived res64."""
    root = tmp_path_factory.mktemp("ljpeg")
    csv = pd.read_csv(nih_sample_dir / "labels.csv")
    chosen = pd.concat([csv[csv["png_mode"] == "RGBA"].head(6), csv[csv["png_mode"] == "L"].head(6)])
    assert (chosen["png_mode"] == "RGBA").sum() == 6, "the sample should hold 6 RGBA images"
    images = root / "images"
    images.mkdir()
    for name in chosen["Image Index"]:
        (images / name).symlink_to(nih_sample_dir / name)
    splits, out = root / "splits.parquet", root / "shards"
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
            str(images),
        ]
    )
    _run(
        [
            "pack",
            "--splits",
            str(splits),
            "--images",
            str(images),
            "--out",
            str(out),
            "--codec",
            "ljpeg",
            "--workers",
            "1",
            "--resize",
            "64",
        ]
    )
    rgba = {n[:-4] for n in chosen.loc[chosen["png_mode"] == "RGBA", "Image Index"]}
    return {"dir": out, "images": images, "keys": {n[:-4] for n in chosen["Image Index"]}, "rgba": rgba}


def _members(directory: Path) -> dict[str, bytes]:
    """name → bytes of every image member of every shard, read with tarfile."""
    out = {}
    for tar_path in sorted(directory.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out.update(
                {
                    m.name: tar.extractfile(m).read()
                    for m in tar
                    if not m.name.endswith((".labels", ".meta", ".id", ".json"))
                }
            )
    return out


def test_members_are_lossless_jpeg_equal_to_the_png_pixels(packed):
    manifest = json.loads((packed["dir"] / "manifest.json").read_text())
    assert manifest["codec"] == "ljpeg" and manifest["quality"] is None
    assert {c["image"] for c in manifest["converted"]} == packed["rgba"]
    members = _members(packed["dir"])
    assert set(members) == {f"{k}.ljpeg" for k in packed["keys"]}
    for name, data in members.items():
        assert b"\xff\xc3" in data[:512], f"{name}: no lossless (SOF3) frame"
        sos = data.index(b"\xff\xda")  # scan header: length(2) Ns(1) Ns×(Cs, Td/Ta) then Ss = predictor
        assert data[sos + 4] == 1 and data[sos + 7] == 1, f"{name}: not one component with predictor 1 (nvJPEG)"
        key = name.split(".")[0]
        # two independent decoders: imagecodecs (lj92) and Pillow's libjpeg-turbo
        np.testing.assert_array_equal(imagecodecs.ljpeg_decode(data), _reference(packed["images"], key))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), _reference(packed["images"], key))


def test_derived_shards_are_ljpeg_lanczos_of_the_source(packed):
    manifest = json.loads((packed["dir"] / "res64" / "manifest.json").read_text())
    assert manifest["codec"] == "ljpeg" and manifest["resolution"] == 64
    for name, data in _members(packed["dir"] / "res64").items():
        assert name.endswith(".ljpeg")
        np.testing.assert_array_equal(
            imagecodecs.ljpeg_decode(data), _reference(packed["images"], name.split(".")[0], 64)
        )


def test_verify_against_sources_passes_masters_and_derived(packed, capsys):
    for folder in (packed["dir"], packed["dir"] / "res64"):
        assert shards_main(["verify", str(folder), "--workers", "1", "--against", str(packed["images"])]) == 0
        assert "12 samples in 3 shards checked" in capsys.readouterr().out


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_decode_ljpeg_pixel_exact(packed, backend, caplog):
    """Every split at 1024 (no resize): the batch pixels are the PNG's grey levels, RGBA ones included."""
    seen = set()
    with caplog.at_level(logging.INFO, logger="cxr.data"):
        for split in ("train", "val", "test"):
            cfg = DataConfig(shards=str(packed["dir"]), backend=backend, resolution=1024, batch_size=4, num_threads=1)
            for batch in build_loader(cfg, split, train=False):
                assert batch["image"].numpy().dtype == np.uint8  # handed over as bytes: the decoded grey levels
                for key, img in zip(batch["key"], batch["image"].numpy()):
                    np.testing.assert_array_equal(img[0], _reference(packed["images"], key), err_msg=key)
                    seen.add(key)
    assert seen == packed["keys"]
    decoder = "cpu (DALI threads)" if backend == "dali" else "cpu (imagecodecs, DataLoader workers)"
    assert f"decode: ljpeg shards on {decoder}" in caplog.text


def _first_train_key(directory: Path) -> str:
    with tarfile.open(directory / "train-000000.tar") as tar:
        return next(m.name for m in tar if m.name.endswith(".ljpeg")).split(".")[0]


def test_verify_against_catches_one_changed_pixel(packed, tmp_path):
    """A valid lossless JPEG of slightly different pixels passes the decode check but not --against."""
    out = tmp_path / "s"
    shutil.copytree(packed["dir"], out)
    key = _first_train_key(out)

    reencoded: dict[str, bytes] = {}

    def change(name: str, data: bytes) -> bytes:
        if name == f"{key}.ljpeg":
            pixels = imagecodecs.ljpeg_decode(data).copy()
            pixels[500, 500] ^= 1
            reencoded["image"] = bytes(imagecodecs.ljpeg_encode(pixels))
            return reencoded["image"]
        if name == f"{key}.json":  # re-recorded crc32: a valid sample in every structural check
            record = json.loads(data)
            record["crc32"]["ljpeg"] = zlib.crc32(reencoded["image"])
            return json.dumps(record, separators=(",", ":")).encode()
        return data

    rewrite_shard(out, "train-000000.tar", change)
    assert verify(out, workers=1).ok
    failures = verify(out, workers=1, against=[packed["images"]]).failures
    assert failures == [
        f"train-000000.tar: {key}: pixels differ from {packed['images'] / (key + '.png')} "
        "(1 pixels, max |diff| 1, mean 0.000)"
    ]


@pytest.fixture(scope="module")
def truncated(packed, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the masters whose first train image lost its second half."""
    out = tmp_path_factory.mktemp("truncated") / "s"
    shutil.copytree(packed["dir"], out)
    shutil.rmtree(out / "res64")
    key = _first_train_key(out)

    def cut(name: str, data: bytes) -> bytes:
        if name != f"{key}.ljpeg":
            return data
        (out / "orig.bytes").write_bytes(data)
        (out / "trunc.bytes").write_bytes(data[: len(data) // 2])
        return data[: len(data) // 2]

    rewrite_shard(out, "train-000000.tar", cut)
    return out, key


def test_verify_rejects_truncated_ljpeg(truncated):
    out, key = truncated
    failures = verify(out, workers=1).failures
    # the decoder's check names the truncation; the per-sample crc32 (format /2) flags the changed bytes too
    assert sorted(failures) == sorted(
        [
            f"train-000000.tar: {key}: lossless JPEG end-of-image marker missing (truncated)",
            f"train-000000.tar: {key}: .ljpeg checksum mismatch (crc32 "
            f"{zlib.crc32((out / 'trunc.bytes').read_bytes()):08x}, packed "
            f"{zlib.crc32((out / 'orig.bytes').read_bytes()):08x}): bytes changed",
        ]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_reject_truncated_ljpeg(packed, truncated, backend):
    out, key = truncated
    cfg = DataConfig(shards=str(out), backend=backend, resolution=128, batch_size=4, num_threads=1)
    with pytest.raises(CxrError, match=rf"train-000000.tar: sample {key} is corrupt"):
        list(build_loader(cfg, "train", train=False))
    loader = build_loader(cfg, "train")
    keys = [k for b in loader for k in b["key"]]
    assert key not in keys and loader.report()["skipped_keys"] == [key]


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_ljpeg_byte_caught_by_verify_and_both_loaders(packed, tmp_path, backend):
    """A flipped byte inside the entropy-coded data still decodes (no JPEG decoder can tell);
    the per-sample crc32 (format /2) names the sample in verify and in both loaders."""
    out = tmp_path / "s"
    shutil.copytree(packed["dir"], out)
    shutil.rmtree(out / "res64")
    key = _first_train_key(out)
    tar_path = out / "train-000000.tar"
    with tarfile.open(tar_path) as tar:
        member = tar.getmember(f"{key}.ljpeg")
    data = bytearray(tar_path.read_bytes())
    original = bytes(data[member.offset_data : member.offset_data + member.size])
    data[member.offset_data + member.size // 2] ^= 0x10
    tar_path.write_bytes(bytes(data))
    member_bytes = bytes(data[member.offset_data : member.offset_data + member.size])
    assert imagecodecs.jpeg8_decode(member_bytes).shape == (1024, 1024)  # still decodes
    failures = verify(out, workers=1).failures
    assert failures[0] == "train-000000.tar: size/sha256 differ from the manifest (corrupt or replaced shard)"
    assert failures[1:] == [
        f"train-000000.tar: {key}: .ljpeg checksum mismatch (crc32 "
        f"{zlib.crc32(member_bytes):08x}, packed {zlib.crc32(original):08x}): bytes changed"
    ]
    cfg = DataConfig(shards=str(out), backend=backend, resolution=128, batch_size=4, num_threads=1)
    with pytest.raises(CxrError, match=rf"train-000000.tar: sample {key} is corrupt \(.ljpeg checksum mismatch"):
        list(build_loader(cfg, "train", train=False))
