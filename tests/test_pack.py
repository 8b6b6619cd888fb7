"""pack: round trips on the real NIH sample, archives, DALI, bad input, resume.

References are independent of the packer: PIL's decode of the original files,
the sample's labels.csv (labels, age, sex, view, file sha256, PNG mode), DALI's
own `wds2idx` tool and webdataset reader, Python's tarfile.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import png_bytes, tiny_dataset
from PIL import Image

from cxrbase.errors import CxrError
from cxrbase.labels import LABELS
from shards.cli import main as cli
from shards.manifest import load_manifest
from shards.pack import pack

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers
def sample_splits(sample_dir: Path) -> pd.DataFrame:
    """A splits table written directly from the sample's labels.csv (not by shards.splits)."""
    csv = pd.read_csv(sample_dir / "labels.csv")
    table = pd.DataFrame({"image": csv["Image Index"], "patient": csv["Patient ID"]})
    table["split"] = [
        "test" if s == "test" else ("val" if p % 5 == 0 else "train")
        for s, p in zip(csv["official_split"], csv["Patient ID"])
    ]
    for label in LABELS:
        table[label] = csv["Finding Labels"].map(lambda f, label=label: int(label in f.split("|")))
    table["age"], table["sex"], table["view"] = csv["Patient Age"], csv["Patient Gender"], csv["View Position"]
    return table


def read_shards(directory: Path) -> dict[str, dict[str, bytes]]:
    """key → {ext: bytes} for every sample of every shard in the manifest, via tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in load_manifest(directory)["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def grey(data_or_path) -> np.ndarray:
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    return np.asarray(Image.open(source).convert("L"))


def make_archive(path: Path, files: list[Path]) -> None:
    """An NIH-style images_0NN.tar.gz: members images/NNNNNNNN_NNN.png."""
    with tarfile.open(path, "w:gz") as tar:
        for file in files:
            tar.add(file, arcname=f"images/{file.name}")


def without_created(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


# ------------------------------------------------------- real sample, png
@pytest.fixture(scope="module")
def packed_sample(nih_sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "shards"
    table = sample_splits(nih_sample_dir)
    manifest = pack(table, [nih_sample_dir], out, shard_size_mb=20, workers=2)
    return out, manifest, table


def test_png_round_trip_real_sample(packed_sample, nih_sample_dir):
    """Every decoded shard image equals PIL's L decode of the original; grey files keep their bytes."""
    out, manifest, _ = packed_sample
    csv = pd.read_csv(nih_sample_dir / "labels.csv").set_index("Image Index")
    samples = read_shards(out)
    assert len(samples) == 130
    for key, members in samples.items():
        row = csv.loc[f"{key}.png"]
        decoded = Image.open(io.BytesIO(members["png"]))
        assert decoded.mode == "L", key
        np.testing.assert_array_equal(np.asarray(decoded), grey(nih_sample_dir / f"{key}.png"), err_msg=key)
        if row["png_mode"] == "L":  # passthrough: the original file, byte for byte
            assert hashlib.sha256(members["png"]).hexdigest() == row["sha256"], key
    rgba = sorted(csv.index[csv["png_mode"] == "RGBA"].str[:-4])
    assert len(rgba) == 6
    assert manifest["converted"] == [{"image": k, "from_mode": "RGBA"} for k in rgba]
    assert manifest["image_sizes"] == {"1024x1024": 130}
    assert manifest["missing"] == [] and manifest["rejected"] == []


def test_labels_meta_json_match_the_table(packed_sample, nih_sample_dir):
    out, _, table = packed_sample
    csv = pd.read_csv(nih_sample_dir / "labels.csv").set_index("Image Index")
    for key, members in read_shards(out).items():
        row = csv.loc[f"{key}.png"]
        findings = set(row["Finding Labels"].split("|")) - {"No Finding"}
        assert list(members["labels"]) == [int(name in findings) for name in LABELS], key
        meta = np.frombuffer(members["meta"], dtype="<f4")
        expected = [
            row["Patient Age"],
            row["Patient Gender"] == "M",
            row["Patient Gender"] == "F",
            row["View Position"] == "PA",
            row["View Position"] == "AP",
        ]
        np.testing.assert_array_equal(meta, np.array(expected, dtype=np.float32), err_msg=key)
        assert members["id"] == key.encode().ljust(32, b"\0")
        record = json.loads(members["json"])
        assert record["patient"] == row["Patient ID"] and record["findings"] == sorted(findings)
        assert record["split"] == table.set_index("image").loc[f"{key}.png", "split"]


def test_manifest_statistics_match_pandas(packed_sample):
    out, manifest, table = packed_sample
    assert load_manifest(out) == manifest
    for split, part in table.groupby("split"):
        stats = manifest["splits"][split]
        assert stats["samples"] == len(part) and stats["patients"] == part["patient"].nunique()
        assert stats["positives"] == {name: int(part[name].sum()) for name in LABELS}
        for name in LABELS:
            assert stats["prevalence"][name] == pytest.approx(part[name].mean(), abs=1e-6)
        assert stats["shards"] == sum(s["split"] == split for s in manifest["shards"])
    train_age = table.loc[table["split"] == "train", "age"]
    assert manifest["meta_stats"]["age_mean"] == pytest.approx(train_age.mean(), abs=1e-5)
    assert manifest["meta_stats"]["age_std"] == pytest.approx(train_age.std(ddof=0), abs=1e-5)
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"] <= 20e6
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    # samples in a shard follow the splits-table order (folder input)
    order = {image[:-4]: i for i, image in enumerate(table["image"])}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            keys = [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".id")]
        assert keys == sorted(keys, key=order.get)


def test_dali_index_matches_wds2idx_and_dali_reads_shards(packed_sample, tmp_path):
    """Our .idx files equal DALI's own wds2idx output; DALI's reader yields every key and label."""
    out, manifest, _ = packed_sample
    wds2idx = pytest.importorskip("wds2idx")
    for shard in manifest["shards"]:
        reference = tmp_path / shard["index"]
        with wds2idx.IndexCreator(str(out / shard["name"]), str(reference), verbose=False) as creator:
            creator.create_index()
        assert (out / shard["index"]).read_text() == reference.read_text(), shard["name"]

    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    tars = [str(out / s["name"]) for s in manifest["shards"]]
    indexes = [str(out / s["index"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=13, num_threads=1, device_id=None)
    def reader():
        ids, labels = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["id", "labels"], missing_component_behavior="error", name="r"
        )
        return ids, labels

    pipe = reader()
    pipe.build()
    assert pipe.epoch_size("r") == 130
    got = {}
    for _ in range(10):
        ids, labels = pipe.run()
        for i in range(len(ids)):
            got[bytes(np.array(ids.at(i))).rstrip(b"\0").decode()] = bytes(np.array(labels.at(i)))
    expected = read_shards(out)
    assert set(got) == set(expected)
    assert all(got[k] == expected[k]["labels"] for k in got)


def test_archive_input_gives_same_pixels(nih_sample_dir, tmp_path):
    """Packing from NIH-style .tar.gz files (streamed) gives the original pixels, RGBA included."""
    table = sample_splits(nih_sample_dir)
    csv = pd.read_csv(nih_sample_dir / "labels.csv")
    chosen = list(csv.loc[csv["png_mode"] == "RGBA", "Image Index"][:2]) + list(csv["Image Index"][:10])
    table = table[table["image"].isin(chosen)]
    files = [nih_sample_dir / name for name in sorted(set(chosen))]
    make_archive(tmp_path / "images_001.tar.gz", files[: len(files) // 2])
    make_archive(tmp_path / "images_002.tar.gz", files[len(files) // 2 :])
    archives = [tmp_path / "images_001.tar.gz", tmp_path / "images_002.tar.gz"]
    manifest = pack(table, archives, tmp_path / "out", workers=2)
    samples = read_shards(tmp_path / "out")
    assert set(samples) == {name[:-4] for name in chosen}
    for key, members in samples.items():
        np.testing.assert_array_equal(grey(members["png"]), grey(nih_sample_dir / f"{key}.png"), err_msg=key)
    assert manifest["source"] == [str(a) for a in archives]
    assert len(manifest["converted"]) == 2
    # archive input: samples follow archive order (here: sorted file names)
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
            keys = [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".id")]
        assert keys == sorted(keys)


# --------------------------------------------------------------- codecs
def test_j2k_lossless_and_jpeg_within_tolerance(nih_sample_dir, tmp_path):
    """j2k: exact pixels. jpeg q95: mean |error| < 1 grey level and PSNR > 40 dB per image."""
    table = sample_splits(nih_sample_dir)
    csv = pd.read_csv(nih_sample_dir / "labels.csv")
    chosen = [csv.loc[csv["png_mode"] == "RGBA", "Image Index"].iloc[-1], *csv["Image Index"][:2]]
    table = table[table["image"].isin(chosen)]
    for codec, ext in (("j2k", "jp2"), ("jpeg", "jpg")):
        manifest = pack(table, [nih_sample_dir], tmp_path / codec, codec=codec, workers=2)
        assert manifest["codec"] == codec and manifest["quality"] == (95 if codec == "jpeg" else None)
        for key, members in read_shards(tmp_path / codec).items():
            assert set(members) == {ext, "labels", "meta", "id", "json"}
            decoded = Image.open(io.BytesIO(members[ext]))
            assert decoded.mode == "L"
            ours, original = np.asarray(decoded).astype(float), grey(nih_sample_dir / f"{key}.png").astype(float)
            if codec == "j2k":
                np.testing.assert_array_equal(ours, original, err_msg=key)
            else:
                error = ours - original
                assert np.abs(error).mean() < 1.0, key
                assert 10 * np.log10(255**2 / np.mean(error**2)) > 40, key


def test_resize_gives_n_by_n_close_to_pil(nih_sample_dir, tmp_path):
    """--resize 64: 64×64 grey; PIL's Lanczos of the original (±1), near a 16×16 box mean."""
    table = sample_splits(nih_sample_dir)
    csv = pd.read_csv(nih_sample_dir / "labels.csv")
    chosen = [csv.loc[csv["png_mode"] == "RGBA", "Image Index"].iloc[-1], *csv["Image Index"][:3]]
    assert csv.set_index("Image Index").loc[chosen, "png_mode"].tolist().count("RGBA") >= 1 and len(set(chosen)) == 4
    table = table[table["image"].isin(chosen)]
    pack(table, [nih_sample_dir], tmp_path / "out", resize=64, workers=2)
    derived = load_manifest(tmp_path / "out" / "res64")
    assert derived["resolution"] == 64 and derived["derived"] is True
    assert derived["image_sizes"] == {"64x64": 4}
    for key, members in read_shards(tmp_path / "out" / "res64").items():
        small = np.asarray(Image.open(io.BytesIO(members["png"]))).astype(int)
        assert small.shape == (64, 64)
        original = Image.open(nih_sample_dir / f"{key}.png").convert("L")
        lanczos = np.asarray(original.resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
        assert np.abs(small - lanczos).max() <= 1, key
        box = np.asarray(original, dtype=float).reshape(64, 16, 64, 16).mean(axis=(1, 3))
        assert np.abs(small - box).mean() < 3.0, key


# ------------------------------------------------------------ bad input
def test_missing_images_error_or_recorded(tmp_path):
    table, folder = tiny_dataset(tmp_path)
    (folder / "00000002_000.png").unlink()
    (folder / "00000005_000.png").unlink()
    with pytest.raises(CxrError, match=r"2 images .* absent .*00000002_000, 00000005_000"):
        pack(table, [folder], tmp_path / "a")
    assert not (tmp_path / "a" / "manifest.json").exists()
    manifest = pack(table, [folder], tmp_path / "b", allow_missing=True)
    assert manifest["missing"] == ["00000002_000", "00000005_000"]
    assert sum(s["samples"] for s in manifest["splits"].values()) == 4


def _bad_images(folder: Path) -> dict[str, str]:
    """Write one broken file per failure mode over the tiny set; return key → expected reason."""
    good = (folder / "00000001_000.png").read_bytes()
    (folder / "00000001_000.png").write_bytes(good[: len(good) // 2])
    idat = good.index(b"IDAT") + 20
    (folder / "00000002_000.png").write_bytes(good[:idat] + bytes([good[idat] ^ 0xFF]) + good[idat + 1 :])
    rgb = np.zeros((64, 64, 4), np.uint8)
    rgb[..., 0], rgb[..., 3] = 200, 255
    (folder / "00000003_000.png").write_bytes(png_bytes(rgb, "RGBA"))
    see_through = np.full((64, 64, 4), 90, np.uint8)
    (folder / "00000004_000.png").write_bytes(png_bytes(see_through, "RGBA"))
    (folder / "00000005_000.png").write_bytes(png_bytes(np.full((64, 64), 40000, np.uint16)))
    return {
        "00000001_000": "truncated PNG",
        "00000002_000": "CRC mismatch in IDAT",
        "00000003_000": "unequal colour channels",
        "00000004_000": "transparent pixels",
        "00000005_000": "16-bit grey",
    }


def test_rejects_recorded_with_reason_and_exit_code(tmp_path):
    table, folder = tiny_dataset(tmp_path)
    expected = _bad_images(folder)
    splits = tmp_path / "splits.csv"
    table.to_csv(splits, index=False)
    args = ["pack", "--splits", str(splits), "--images", str(folder), "--workers", "1"]
    assert cli(args + ["--out", str(tmp_path / "strict")]) != 0
    strict = load_manifest(tmp_path / "strict")  # written anyway: every image is accounted for
    assert cli(args + ["--out", str(tmp_path / "lenient"), "--allow-rejects"]) == 0
    manifest = load_manifest(tmp_path / "lenient")
    assert without_created(manifest) == without_created(strict)
    reasons = {r["image"]: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == set(expected)
    for key, words in expected.items():
        assert words in reasons[key], (key, reasons[key])
    assert [s["samples"] for s in manifest["splits"].values()] == [0, 0, 1]  # only 00000006 (test) is left


def _undecodable_with_valid_crcs(png: bytes) -> bytes:
    """Damage the deflate stream of the first IDAT and recompute its CRC (battery 2.11)."""
    import struct
    import zlib

    pos = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[pos : pos + 4])
    body = bytearray(png[pos + 8 : pos + 8 + length])
    body[2:length] = bytes(b ^ 0x5A for b in body[2:length])
    crc = zlib.crc32(b"IDAT" + bytes(body)).to_bytes(4, "big")
    return png[: pos + 8] + bytes(body) + crc + png[pos + 12 + length :]


def test_structurally_valid_but_undecodable_png_is_rejected(tmp_path):
    table, folder = tiny_dataset(tmp_path, n=3)
    bad = _undecodable_with_valid_crcs((folder / "00000001_000.png").read_bytes())
    (folder / "00000001_000.png").write_bytes(bad)
    with pytest.raises(Exception):  # the reference: PIL cannot decode it either
        Image.open(io.BytesIO(bad)).load()
    with pytest.raises(CxrError, match=r"1 images rejected \(00000001_000: undecodable image"):
        pack(table, [folder], tmp_path / "out", workers=1)
    manifest = load_manifest(tmp_path / "out")
    assert [r["image"] for r in manifest["rejected"]] == ["00000001_000"]
    assert "00000001_000" not in read_shards(tmp_path / "out")


def test_grey_rgb_is_converted_with_identical_pixels(tmp_path):
    table, folder = tiny_dataset(tmp_path, n=3)
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    (folder / "00000002_000.png").write_bytes(png_bytes(np.stack([pixels] * 3, axis=-1), "RGB"))
    manifest = pack(table, [folder], tmp_path / "out")
    assert manifest["converted"] == [{"image": "00000002_000", "from_mode": "RGB"}]
    decoded = Image.open(io.BytesIO(read_shards(tmp_path / "out")["00000002_000"]["png"]))
    assert decoded.mode == "L"
    np.testing.assert_array_equal(np.asarray(decoded), pixels)


def test_duplicate_ids_are_errors_naming_both_places(tmp_path):
    table, folder = tiny_dataset(tmp_path, n=3)
    make_archive(tmp_path / "images_001.tar.gz", [folder / "00000002_000.png"])
    with pytest.raises(
        CxrError,
        match=r"images_001.tar.gz:images/00000002_000.png: duplicate .*"
        r"images/00000002_000.png",
    ):
        pack(table, [folder, tmp_path / "images_001.tar.gz"], tmp_path / "a")
    other = tmp_path / "more"
    other.mkdir()
    (other / "00000003_000.png").write_bytes((folder / "00000003_000.png").read_bytes())
    with pytest.raises(CxrError, match=r"duplicate image id '00000003_000'"):
        pack(table, [folder, other], tmp_path / "b")
    copy = tmp_path / "images_003.tar.gz"
    copy.write_bytes((tmp_path / "images_001.tar.gz").read_bytes())
    with pytest.raises(CxrError, match=r"images_003.tar.gz:images/00000002_000.png: duplicate .*images_001"):
        pack(table, [tmp_path / "images_001.tar.gz", copy], tmp_path / "c")


def test_bad_table_and_options_are_clear_errors(tmp_path):
    table, folder = tiny_dataset(tmp_path, n=3)
    bad = table.copy()
    bad.loc[1, "Mass"] = 2
    with pytest.raises(CxrError, match=r"label value other than 1, 0, -1 \(uncertain\) or empty \(unknown\)"):
        pack(bad, [folder], tmp_path / "a")
    with pytest.raises(CxrError, match="duplicate image id"):
        pack(pd.concat([table, table.iloc[:1]]), [folder], tmp_path / "b")
    with pytest.raises(CxrError, match="does not exist"):
        pack(table, [tmp_path / "nowhere"], tmp_path / "c")
    with pytest.raises(CxrError, match="missing columns"):
        pack(table.drop(columns=["view"]), [folder], tmp_path / "d")


def test_patient_in_two_splits_is_refused_naming_patient_and_images(tmp_path, capsys):
    table, folder = tiny_dataset(tmp_path, n=6)
    # the 2nd image (patient 2, val) is given to patient 1, whose image 1 is in train
    leak = table.assign(patient=[1, 1, 3, 4, 5, 6])
    assert leak.loc[0, "split"] == "train" and leak.loc[1, "split"] == "val"
    path = tmp_path / "leak.parquet"
    leak.to_parquet(path)
    assert cli(["pack", "--splits", str(path), "--images", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: 1 patient(s) have images in more than one split" in err
    assert "patient 1: " in err and "train ['00000001_000']" in err and "val ['00000002_000']" in err
    assert not (tmp_path / "out" / "manifest.json").exists() and not list((tmp_path / "out").glob("*.tar"))


def test_nih_name_disagreeing_with_patient_is_a_warning(tmp_path, capsys):
    table, folder = tiny_dataset(tmp_path, n=3)
    pack(table.assign(patient=[1, 2, 30]), [folder], tmp_path / "out", workers=1)
    err = capsys.readouterr().err
    assert "warning: splits table: 1 NIH-named image(s)" in err and "00000003_000 (patient 30)" in err


@pytest.mark.parametrize("content", [b"", b"PAR1\x00\x01garbage"])
def test_corrupt_splits_file_is_a_clean_error(tmp_path, capsys, content):
    _, folder = tiny_dataset(tmp_path, n=2)
    path = tmp_path / "splits.parquet"
    path.write_bytes(content)
    assert cli(["pack", "--splits", str(path), "--images", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: unreadable splits table") and err.count("\n") == 1


# --------------------------------------------------------------- resume
def test_rerun_skips_complete_shards_without_reading_images(tmp_path, monkeypatch):
    table, folder = tiny_dataset(tmp_path, n=9, size=128)
    first = pack(table, [folder], tmp_path / "out", shard_size_mb=0.04)
    assert first["splits"]["train"]["shards"] >= 2
    import shards.pack as pack_module

    calls = []
    real = pack_module.prepare_image
    monkeypatch.setattr(pack_module, "prepare_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = pack(table, [folder], tmp_path / "out", shard_size_mb=0.04, workers=1)
    assert calls == [] and without_created(again) == without_created(first)
    # a damaged shard is re-packed (with the later shards of its split), to the same result
    second = next(s for s in first["shards"] if s["name"] == "train-000001.tar")
    later = set()
    for shard in first["shards"]:
        if shard["split"] == "train" and shard["name"] >= second["name"]:
            with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
                later |= {m.name.split(".")[0] for m in tar.getmembers()}
    damaged = tmp_path / "out" / second["name"]
    damaged.write_bytes(damaged.read_bytes()[:-1000])
    repaired = pack(table, [folder], tmp_path / "out", shard_size_mb=0.04, workers=1)
    assert without_created(repaired) == without_created(first)
    assert sorted(calls) == sorted(later)
    with pytest.raises(CxrError, match="other settings"):
        pack(table, [folder], tmp_path / "out", shard_size_mb=0.05)


@pytest.mark.slow
def test_killed_pack_leaves_no_partial_file_and_resumes_identically(nih_sample_dir, tmp_path):
    """SIGKILL after the first shard completes; the re-run's manifest equals an uninterrupted run's."""
    splits = tmp_path / "splits.csv"
    sample_splits(nih_sample_dir).iloc[:60].to_csv(splits, index=False)
    args = [
        sys.executable,
        "-m",
        "shards",
        "pack",
        "--splits",
        str(splits),
        "--images",
        str(nih_sample_dir),
        "--codec",
        "jpeg",
        "--shard-size-mb",
        "0.6",
        "--workers",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        args + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    journal = killed / ".pack-journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert entries and not (killed / "manifest.json").exists()
    finished = {e["name"] for e in entries} | {e["index"] for e in entries}
    for path in killed.iterdir():
        if not path.name.startswith("."):  # anything under a final name is a complete, journaled shard
            assert path.name in finished, path.name
    for entry in entries:
        assert hashlib.sha256((killed / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]

    rerun = subprocess.run(args + ["--out", str(killed)], env=env, check=True, capture_output=True, text=True)
    assert f"{sum(e['samples'] for e in entries)} already packed" in rerun.stdout
    subprocess.run(args + ["--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    resumed, whole = load_manifest(killed), load_manifest(tmp_path / "whole")
    assert without_created(resumed) == without_created(whole)
    assert len(whole["shards"]) > len(entries)
    assert not list(killed.glob(".*.tmp"))


# ---------------------------------------------------------------- misc
def test_shards_never_imports_torch():
    code = (
        "import sys, shards.pack, shards.verify, shards.derive, shards.sources, shards.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_load_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(CxrError, match=str(tmp_path / "manifest.json")):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CxrError, match="unreadable manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "cxr-shards/1"}))
    with pytest.raises(CxrError, match="invalid shards manifest"):
        load_manifest(tmp_path)


def test_pack_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        cli(["pack", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--splits",
        "--images",
        "--out",
        "--codec",
        "--quality",
        "--resize",
        "--shard-size-mb",
        "--workers",
        "--allow-missing",
        "--allow-rejects",
    ):
        assert option in text


def test_tar_headers_equal_tarfiles():
    """The fast header builder writes exactly what tarfile writes for the same member."""
    from shards.tar_writer import _header

    for name, size in [("00000001_000.png", 412345), ("k.labels", 14), ("a" * 100, 0), ("x.json", 8**11 - 1)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
        assert _header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


def test_pool_workers_exit_when_the_parent_is_killed(tmp_path):
    """Battery 3.3: after kill -9 of the parent, its spawn workers must not stay behind."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import multiprocessing, os, sys, threading\n"
            "from shards.pack import _executor\n"
            "pool = _executor('jpeg', 2)\n"
            "[f.result() for f in [pool.submit(os.getpid), pool.submit(os.getpid)]]\n"  # workers started
            "print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
            "threading.Event().wait()\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    workers: list[int] = []
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) >= 1
        parent.kill()
        parent.wait(timeout=30)

        def alive(pid: int) -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                return False
            return state not in ("Z", "X")  # a zombie has exited; only its reaping is pending

        deadline = time.monotonic() + 30
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)  # bounded poll on the workers' exit (no event crosses a dead parent)
        assert not any(map(alive, workers)), f"workers {workers} still running after their parent died"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:  # leave nothing behind when the check fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_disk_full_is_one_line_naming_the_shard_and_resumable(tmp_path, monkeypatch, capsys):
    """Battery 3.10: ENOSPC while writing a shard (os.writev fails as on a full tmpfs)."""
    table, folder = tiny_dataset(tmp_path, n=6)
    splits = tmp_path / "splits.csv"
    table.to_csv(splits, index=False)
    args = ["pack", "--splits", str(splits), "--images", str(folder), "--out", str(tmp_path / "out"), "--workers", "1"]

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "writev", full)
    assert cli(args) == 2
    out = capsys.readouterr().err
    assert "Traceback" not in out
    (err,) = [line for line in out.split("\n") if line.startswith("error:")]  # besides the progress bar
    assert err.startswith(f"error: {tmp_path / 'out' / 'train-000000.tar'}: no space left on device — free space")
    assert "a re-run resumes" in err
    assert not list((tmp_path / "out").glob(".*.tmp")) and not list((tmp_path / "out").glob("*.tar"))
    monkeypatch.undo()
    assert cli(args) == 0 and load_manifest(tmp_path / "out")["splits"]["train"]["samples"] == 2


def test_read_only_output_is_one_line(tmp_path, monkeypatch, capsys):
    """Battery 3.11: --out on a read-only file system (mkdir fails with EROFS)."""
    table, folder = tiny_dataset(tmp_path, n=3)
    splits = tmp_path / "splits.csv"
    table.to_csv(splits, index=False)
    out = tmp_path / "ro" / "shards"

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert cli(["pack", "--splits", str(splits), "--images", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out}: read-only file system — choose a writable --out / checkpoint.run_dir\n"


def test_other_os_errors_keep_their_traceback():
    from cxrbase.errors import cli_entry

    def main(argv):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        cli_entry(main)([])


# An editable install maps `shards.*` to the checkout through a finder that runs after the
# path search, so a cwd folder named shards/ becomes the top-level module (battery 3.12).
# This launcher reproduces that without depending on how the venv was installed.
_EDITABLE_LIKE = """
import importlib.util, runpy, sys  # noqa: E401
from pathlib import Path
ROOT = Path(sys.argv.pop(1))

class Editable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "shards":
            return None
        base = ROOT.joinpath(*name.split("."))
        if base.is_dir():
            return importlib.util.spec_from_file_location(name, base / "__init__.py",
                                                          submodule_search_locations=[str(base)])
        return importlib.util.spec_from_file_location(name, base.with_suffix(".py")) if base.with_suffix(".py").is_file() else None

from importlib.machinery import PathFinder
sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, Editable())  # before the venv's own finders
sys.path.insert(0, "")  # the working directory first, as `python -m` puts it
runpy.run_module("shards", run_name="__main__", alter_sys=True)
"""


def test_cwd_folder_named_shards_does_not_break_pack(tmp_path):
    from importlib.metadata import version

    table, folder = tiny_dataset(tmp_path, n=3)
    table.to_csv(tmp_path / "splits.csv", index=False)
    (tmp_path / "shards").mkdir()  # e.g. the packed shards of an earlier run
    (tmp_path / "launch.py").write_text(_EDITABLE_LIKE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = subprocess.run(
        [sys.executable, "launch.py", str(ROOT), "-c", "pass"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "launch.py",
            str(ROOT),
            "pack",
            "--splits",
            "splits.csv",
            "--images",
            str(folder),
            "--out",
            "out",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.returncode != 0  # the launcher runs shards' CLI (which rejects `-c`), nothing else
    assert done.returncode == 0, done.stderr
    assert f"warning: {tmp_path / 'shards'}: this folder shadows the cxr package" in done.stderr
    assert load_manifest(tmp_path / "out")["package_version"] == version("cxr")


def test_console_scripts_point_at_cli_entry_points():
    import importlib

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"cxr-shards", "cxr-train", "cxr-evaluate", "cxr-data", "cxr-models"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        main = getattr(importlib.import_module(module), attr)
        with pytest.raises(SystemExit) as exit_:  # argparse's --help: each parses its own arguments
            main(["--help"])
        assert exit_.value.code == 0, name


def test_partial_download_fails_before_reading_and_names_restrict_to(
    nih_dir, nih_sample_dir, tmp_path, monkeypatch, capsys
):
    """README step 1 on a partial download: the official split of the real 112,120-image metadata,
    two archives in NIH's layout holding 24 of its images. pack fails before reading any image
    (prepare_image never runs, nothing is written), its error names `split --restrict-to` before
    --allow-missing, and the command it names then packs exactly the archives' images."""
    names = sorted(p.name for p in nih_sample_dir.glob("*.png"))[:24]
    archives = [tmp_path / "images_001.tar.gz", tmp_path / "images_002.tar.gz"]
    make_archive(archives[0], [nih_sample_dir / n for n in names[:12]])
    make_archive(archives[1], [nih_sample_dir / n for n in names[12:]])
    metadata = str(nih_dir / "Data_Entry_2017_v2020.csv.gz")
    official = tmp_path / "splits-official.parquet"
    assert cli(["split", "--metadata", metadata, "--scheme", "official", "--out", str(official)]) == 0
    import shards.pack as pack_module

    calls = []
    real = pack_module.prepare_image
    monkeypatch.setattr(pack_module, "prepare_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    capsys.readouterr()
    out = tmp_path / "shards"
    assert cli(["pack", "--splits", str(official), "--images", *map(str, archives), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{112_120 - 24} images listed in the splits table are absent" in error
    assert error.index("split --metadata CSV --scheme SCHEME --restrict-to") < error.index("--allow-missing")
    assert f"--restrict-to {archives[0]} {archives[1]}" in error
    assert calls == [] and not list(out.glob("*.tar")) and not (out / "manifest.json").exists()
    partial = tmp_path / "splits-partial.parquet"
    assert (
        cli(
            [
                "split",
                "--metadata",
                metadata,
                "--scheme",
                "official",
                "--restrict-to",
                *map(str, archives),
                "--out",
                str(partial),
            ]
        )
        == 0
    )
    assert cli(["pack", "--splits", str(partial), "--images", *map(str, archives), "--out", str(out)]) == 0
    assert set(read_shards(out)) == {n[:-4] for n in names} and sorted(calls) == sorted(n[:-4] for n in names)


def test_verify_against_the_archives_pack_read(nih_sample_dir, tmp_path, capsys):
    """`verify --against images_0*.tar.gz`: the archives pack read are accepted (streamed, not extracted);
    a member whose pixels differ, and a key absent from them, are failures naming the image."""
    names = sorted(p.name for p in nih_sample_dir.glob("*.png"))[:8]
    table = sample_splits(nih_sample_dir)
    table = table[table["image"].isin(names)]
    archives = [tmp_path / "images_001.tar.gz", tmp_path / "images_002.tar.gz"]
    make_archive(archives[0], [nih_sample_dir / n for n in names[:4]])
    make_archive(archives[1], [nih_sample_dir / n for n in names[4:]])
    pack(table, archives, tmp_path / "out", codec="j2k", workers=1)
    capsys.readouterr()
    assert cli(["verify", str(tmp_path / "out"), "--workers", "1", "--against", *map(str, archives)]) == 0
    assert ": OK — " in capsys.readouterr().out
    # other sources: names[1] carries names[0]'s pixels, names[7] is not there at all
    other = tmp_path / "other"
    other.mkdir()
    (other / names[1]).write_bytes((nih_sample_dir / names[0]).read_bytes())
    for name in names[2:7]:
        (other / name).write_bytes((nih_sample_dir / name).read_bytes())
    wrong = tmp_path / "wrong" / "images_001.tar.gz"
    wrong.parent.mkdir()
    make_archive(wrong, [other / n for n in names[1:7]])
    assert cli(["verify", str(tmp_path / "out"), "--workers", "1", "--against", str(wrong)]) == 1
    out = capsys.readouterr().out
    assert f"{names[1][:-4]}: pixels differ from {wrong}:images/{names[1]}" in out
    assert f"{names[7][:-4]}: no source image of this key in --against" in out
    assert f"{names[0][:-4]}: no source image" in out and f"{names[3][:-4]}:" not in out
