"""DICOM radiographs → the 8-bit grey master the rest of cxr uses (no torch here).

What a reader must get right, in the order the standard applies it (PS3.3 C.7.6.3, C.11):

1. **Stored values** from the pixel data, decoded by pydicom (uncompressed, RLE) or its
   pylibjpeg plugins (JPEG baseline and lossless); the bit depth comes from the header
   (``BitsStored`` 12, 14, 16 …), never assumed.
2. **Modality LUT**: ``RescaleSlope``/``RescaleIntercept`` or a Modality LUT Sequence
   (pydicom's ``apply_modality_lut``).
3. **VOI LUT**: a VOI LUT Sequence when present (its first item), else the first of the
   ``WindowCenter``/``WindowWidth`` pairs (the one the modality lists first, its default view;
   several pairs are alternatives, e.g. "lung" and "mediastinum"), with ``VOILUTFunction``
   LINEAR (default), LINEAR_EXACT or SIGMOID — written out below from PS3.3 C.11.2.1.2 straight
   onto 0…255, so there is one rounding. Neither present: the image's own min…max.
4. **MONOCHROME1** (bright = low values, common on CR/DX plates) is inverted after the VOI
   step, so every master has bright bone.

Why 8 bit after the VOI step: the models, the loaders, the browser page and the NIH masters
are all 8-bit grey, and the VOI transform is where the modality says which part of its 12–16
bit range a reader should look at. What is lost: contrast outside the chosen window (clipped)
and the finer grey steps inside it (a 12-bit image has 16 stored values per output level) —
the same loss a radiologist's 8-bit display makes, and the one NIH's PNGs already carry.

De-identification: only ``ViewPosition``, ``PatientSex``, ``PatientAge`` and the pixel spacing
are read as metadata (:class:`DicomImage`); no name, ID, date or institution leaves this module.
``PatientID`` is read by :func:`patient_keys` alone, and leaves only as a keyed hash (HMAC-SHA256
with a secret salt the user keeps): the patient key that keeps splits patient-level.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np

from cxrbase.errors import CxrError

PREAMBLE_MAGIC = b"DICM"  # PS3.10 7.1: 128-byte preamble, then "DICM"
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class DicomImage:
    """One decoded radiograph: 8-bit grey pixels [H, W] and the non-identifying metadata."""

    pixels: np.ndarray
    view: str | None
    sex: str | None
    age: float | None
    spacing_mm: tuple[float, float] | None
    voi: str  # which VOI step was applied, for logs and manifests


def has_preamble(data: bytes) -> bool:
    """True when ``data`` starts like a DICOM Part 10 file (128-byte preamble + "DICM")."""
    return len(data) >= 132 and data[128:132] == PREAMBLE_MAGIC


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file whose bytes 128…131 are "DICM" (extensionless PACS exports)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return has_preamble(fh.read(132))
    except OSError:
        return False


def read_dicom(source: str | Path | bytes, name: str | None = None) -> DicomImage:
    """Decode one single-frame grey DICOM image to the 8-bit master; CxrError naming the file otherwise."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    where = name or (str(source) if not isinstance(source, bytes) else "DICOM bytes")
    data = Path(source).read_bytes() if not isinstance(source, bytes) else source
    if not has_preamble(data):
        raise CxrError(
            f"{where}: no DICOM preamble ('DICM' at byte 128) — not a DICOM Part 10 file; "
            "export it from the PACS as a DICOM file (or convert it to PNG)"
        )
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError) as err:
        raise CxrError(f"{where}: unreadable DICOM ({type(err).__name__}: {err}) — re-export the file") from None
    _check_is_grey_radiograph(ds, where)
    try:
        stored = ds.pixel_array
    except Exception as err:  # a missing decoder plugin, a damaged fragment …
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name_ = getattr(syntax, "name", syntax)
        raise CxrError(
            f"{where}: pixel data do not decode ({type(err).__name__}: {err}; transfer syntax "
            f"{name_}) — install pydicom's decoder plugins (pip install pylibjpeg pylibjpeg-libjpeg) or re-export "
            "uncompressed"
        ) from None
    pixels = voi_to_8bit(ds, stored)
    return DicomImage(
        pixels=pixels,
        view=_text(ds, "ViewPosition"),
        sex=_text(ds, "PatientSex"),
        age=_age_years(ds),
        spacing_mm=_spacing(ds),
        voi=_voi_name(ds),
    )


def _check_is_grey_radiograph(ds, where: str) -> None:
    """Refuse what is not one grey image: no pixel data (SR, KO, PR …), several frames, colour."""
    if "PixelData" not in ds:
        kind = getattr(ds, "Modality", "?")
        sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "?"))
        raise CxrError(
            f"{where}: not an image (modality {kind}, {sop}: no pixel data) — pass the study's "
            "radiograph files, not its reports or presentation states"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise CxrError(
            f"{where}: a multi-frame object ({frames} frames) — cxr reads single radiographs; "
            "export the frame you want as its own file"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise CxrError(
            f"{where}: photometric interpretation {photometric or '?'} with "
            f"{ds.get('SamplesPerPixel', '?')} samples per pixel — cxr reads grey radiographs "
            "(MONOCHROME1/2)"
        )


def voi_to_8bit(ds, stored: np.ndarray) -> np.ndarray:
    """Stored values → modality LUT → VOI (sequence, window or min–max) → MONOCHROME1 inversion → uint8."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    modality = apply_modality_lut(stored, ds)
    values = np.asarray(modality, dtype=np.float64)
    if ds.get("VOILUTSequence"):
        # the LUT's entries span 0 … 2^bits − 1 (its descriptor's third value): scaled onto 0 … 255
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = np.asarray(apply_voi_lut(modality, ds, index=0, prefer_lut=True), dtype=np.float64)
        out = out * (255.0 / (2**bits - 1))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        out = window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")).upper())
    else:
        low, high = float(values.min()), float(values.max())
        out = np.zeros_like(values) if high == low else (values - low) * (255.0 / (high - low))
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 onto the output range 0…255 (float, not yet rounded)."""
    y_range = 255.0
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise CxrError(f"window width {width} must be > 0 for LINEAR_EXACT")
        out = (x - center) / width + 0.5
    elif function == "SIGMOID":
        if width <= 0:
            raise CxrError(f"window width {width} must be > 0 for SIGMOID")
        return y_range / (1 + np.exp(-4 * (x - center) / width))
    else:  # LINEAR (the default and any unknown value, as the standard's fallback)
        if width < 1:
            raise CxrError(f"window width {width} must be ≥ 1 for LINEAR")
        if width == 1:  # the formula's (w − 1) vanishes: a step at the centre
            return np.where(x <= center - 0.5, 0.0, y_range)
        out = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0) * y_range


def _first(value) -> float:
    """The first of a multi-valued DS element (alternative windows), or the value itself."""
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _voi_name(ds) -> str:
    if ds.get("VOILUTSequence"):
        return "VOI LUT sequence (first item)"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return (
            f"window C={_first(ds.WindowCenter):g} W={_first(ds.WindowWidth):g} "
            f"{str(ds.get('VOILUTFunction', 'LINEAR')).upper()}"
        )
    return "min–max of the image (no window in the header)"


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def _age_years(ds) -> float | None:
    """PatientAge 'nnnD/W/M/Y' (PS3.5 AS) → years."""
    raw = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(raw) != 4 or not raw[:3].isdigit() or raw[3] not in "DWMY":
        return None
    return int(raw[:3]) / {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[raw[3]]


def _spacing(ds) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    return None


# ---------------------------------------------------------------------------------------------- patients
MIN_SALT_BYTES = 16
SALT_ENV = "CXR_PATIENT_SALT"


def read_salt(path: str | Path | None) -> bytes:
    """The secret salt of the patient keys: the bytes of ``path`` (surrounding whitespace dropped), else
    the environment variable CXR_PATIENT_SALT. Never written anywhere by cxr: with the salt, anyone
    holding the outputs could hash candidate IDs (hospital IDs are few and guessable) and match them."""
    if path is not None:
        try:
            salt = Path(path).read_bytes().strip()
        except OSError as err:
            raise CxrError(
                f"{path}: salt file unreadable ({err.strerror or err}) — pass a file of random bytes"
            ) from None
        where = str(path)
    else:
        salt, where = os.environ.get(SALT_ENV, "").strip().encode(), f"${SALT_ENV}"
        if not salt:
            raise CxrError(
                f"{where}: no salt for the patient keys — pass --patient-salt-file FILE (e.g. made once with "
                f"`head -c 32 /dev/urandom | base64 > FILE`, kept secret and reused for every table) or set {SALT_ENV}"
            )
    if len(salt) < MIN_SALT_BYTES:
        raise CxrError(
            f"{where}: salt of {len(salt)} bytes is too short to keep patient IDs from being guessed — use at "
            f"least {MIN_SALT_BYTES} random bytes (`head -c 32 /dev/urandom | base64`)"
        )
    return salt


def patient_key(patient_id: str, salt: bytes) -> int:
    """A PatientID → a non-negative 63-bit integer: the first 8 bytes of HMAC-SHA256(salt, ID), big-endian."""
    digest = hmac.new(salt, patient_id.strip().encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def patient_keys(files: Mapping[str, Path], salt: bytes) -> dict[str, int]:
    """Image key → salted patient key of each DICOM's ``PatientID`` (headers only, no pixel data read).

    A file that is not DICOM or has no PatientID is an error naming it (an image without a patient
    would have to guess its split, and a guess can leak a patient across splits)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    out: dict[str, int] = {}
    for key, path in files.items():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        except (InvalidDicomError, ValueError, EOFError, OSError) as err:
            raise CxrError(
                f"{path}: not a readable DICOM ({type(err).__name__}) — patient keys come from DICOM headers; "
                "give a table with a patient column for other images"
            ) from None
        value = str(ds.get("PatientID", "") or "").strip()
        if not value:
            raise CxrError(
                f"{path}: no PatientID in the header — cannot keep this image's patient in one split; "
                "add it in the PACS export or give a table with a patient column"
            )
        out[key] = patient_key(value, salt)
    return out
