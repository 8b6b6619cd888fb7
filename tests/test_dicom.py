"""DICOM → 8-bit master (shards.dicom) against hand computations of PS3.3's transforms,
and pack reading DICOM folders without letting an identifying header field into any output."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from dicom_data import IDENTIFYING, dicom_bytes, ramp, structured_report
from PIL import Image

from cxrbase.errors import CxrError
from shards.dicom import read_dicom


def hand_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), written from the standard's three cases, onto 0…255, rounded."""
    x = x.astype(np.float64)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0, y)
    y = np.where(x > c - 0.5 + (w - 1) / 2, 255, y)
    return np.rint(y).astype(np.uint8)


@pytest.mark.parametrize("syntax", ["explicit", "rle", "jpeg-lossless"])
def test_12_bit_window_equals_the_standards_formula(syntax):
    stored = ramp(bits=12)
    got = read_dicom(dicom_bytes(stored, syntax=syntax, WindowCenter=1800, WindowWidth=2400)).pixels
    want = hand_window(stored, 1800, 2400)
    assert got.dtype == np.uint8 and got.shape == stored.shape
    assert np.abs(got.astype(int) - want).max() <= 1
    assert (got == 0).any() and (got == 255).any()  # the window clips on both sides


def test_window_agrees_with_pydicoms_own_voi_rescaled():
    """A second implementation: pydicom's apply_voi_lut works in the stored range; rescale it to 8 bit."""
    import pydicom
    from pydicom.pixels import apply_voi_lut

    data = dicom_bytes(ramp(bits=14, seed=3), bits_stored=14, WindowCenter=9000, WindowWidth=5001)
    ds = pydicom.dcmread(io.BytesIO(data))
    ref = apply_voi_lut(ds.pixel_array, ds) / (2**14 - 1) * 255
    got = read_dicom(data).pixels
    assert np.abs(got.astype(float) - ref).max() <= 1.0


def test_monochrome1_is_inverted():
    stored = ramp(bits=12, seed=1)
    m2 = read_dicom(dicom_bytes(stored, WindowCenter=2048, WindowWidth=4096)).pixels
    m1 = read_dicom(dicom_bytes(stored, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)).pixels
    np.testing.assert_array_equal(m1.astype(int), 255 - m2.astype(int))
    # bright stays bright for the reader: the largest stored value is black under MONOCHROME1
    assert m1[np.unravel_index(stored.argmax(), stored.shape)] <= 1


def test_rescale_slope_and_intercept_come_before_the_window():
    stored = ramp(bits=12, seed=2)
    got = read_dicom(
        dicom_bytes(stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=500, WindowWidth=3000)
    ).pixels
    want = hand_window(stored.astype(np.float64) * 2 - 1024, 500, 3000)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_voi_lut_sequence_is_preferred_to_the_window():
    from pydicom.dataset import Dataset

    stored = ramp(bits=10, seed=4)
    first, entries, bits = 100, 700, 12
    lut = (np.linspace(0, 1, entries) ** 0.5 * (2**bits - 1)).astype(np.uint16)  # a gamma curve
    item = Dataset()
    item.LUTDescriptor = [entries, first, bits]
    item.LUTData = lut.astype("<u2").tobytes()  # OW, as modalities write long LUTs
    data = dicom_bytes(stored, bits_stored=10, VOILUTSequence=[item], WindowCenter=10, WindowWidth=5)
    got = read_dicom(data).pixels
    want = np.rint(lut[np.clip(stored.astype(int) - first, 0, entries - 1)] / (2**bits - 1) * 255)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_no_window_uses_the_images_range_at_its_own_bit_depth():
    stored = ramp(bits=14, seed=5)
    got = read_dicom(dicom_bytes(stored, bits_stored=14)).pixels
    lo, hi = stored.min(), stored.max()
    want = np.rint((stored.astype(float) - lo) / (hi - lo) * 255)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_metadata_is_the_non_identifying_fields():
    image = read_dicom(dicom_bytes(ramp()))
    assert (image.view, image.sex, image.age, image.spacing_mm) == ("PA", "F", 67.0, (0.143, 0.143))
    text = repr(image.__dict__.keys()) + repr([v for k, v in image.__dict__.items() if k != "pixels"])
    assert not any(marker in text for marker in IDENTIFYING.values())


@pytest.mark.parametrize(
    "case, data, message",
    [
        ("multiframe", lambda: dicom_bytes(ramp(), frames=3), "multi-frame object (3 frames)"),
        ("report", structured_report, "not an image (modality SR"),
        ("nopreamble", lambda: dicom_bytes(ramp(), preamble=False), "no DICOM preamble"),
        ("rgb", lambda: dicom_bytes(ramp(), photometric="RGB"), "photometric interpretation RGB"),
    ],
)
def test_refused_objects_get_one_line_errors(case, data, message):
    with pytest.raises(CxrError) as err:
        read_dicom(data(), name=f"study/{case}.dcm")
    text = str(err.value)
    assert text.startswith(f"study/{case}.dcm: ") and message in text and "\n" not in text and " — " in text


@pytest.mark.integration
def test_pack_reads_a_dicom_folder_and_writes_no_identifying_field(tmp_path):
    """`cxr-shards split` + `pack` on .dcm and extensionless DICOMs: masters equal read_dicom's pixels,
    and no identifying header value appears in any file written."""
    from shards.cli import main as shards_main

    images = tmp_path / "pacs"
    (images / "series").mkdir(parents=True)
    rows = ["image,Mass,patient"]  # names as the folder has them: with .dcm, or extensionless
    want = {}
    for i in range(12):
        stored = ramp(64, 64, seed=i)
        mono = "MONOCHROME1" if i % 3 == 0 else "MONOCHROME2"
        data = dicom_bytes(
            stored, photometric=mono, syntax=("rle" if i % 2 else "explicit"), WindowCenter=2048, WindowWidth=3000
        )
        name = f"img{i:02d}" + (".dcm" if i % 4 else "")  # every 4th without extension (PACS export)
        (images / "series" / name).write_bytes(data)
        want[f"img{i:02d}"] = read_dicom(data).pixels
        rows.append(f"{name},{i % 2},{i // 2}")
    (images / "series" / "notes.txt").write_text("not an image")  # neither PNG nor DICOM: not picked up
    csv = tmp_path / "task.csv"
    csv.write_text("\n".join(rows) + "\n")
    splits, out = tmp_path / "splits.parquet", tmp_path / "shards"
    assert (
        shards_main(
            [
                "split",
                "--metadata",
                str(csv),
                "--scheme",
                "random",
                "--seed",
                "0",
                "--fractions",
                "0.5,0.25,0.25",
                "--out",
                str(splits),
            ]
        )
        == 0
    )
    assert (
        shards_main(["pack", "--splits", str(splits), "--images", str(images), "--out", str(out), "--workers", "1"])
        == 0
    )
    assert shards_main(["verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    import tarfile

    seen = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    seen[member.name[:-4]] = np.asarray(Image.open(tar.extractfile(member)))
    assert set(seen) == set(want)
    for key, pixels in want.items():
        np.testing.assert_array_equal(seen[key], pixels)
    blob = b"".join(p.read_bytes() for p in [*out.rglob("*"), splits] if p.is_file())
    for marker in IDENTIFYING.values():
        assert marker.encode() not in blob, marker
