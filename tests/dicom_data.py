"""DICOM fixtures written with pydicom, as a modality or a PACS export would write them.

Identifying fields carry the marker strings of :data:`IDENTIFYING` so a test can grep every
output for them.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np

IDENTIFYING = {
    "PatientName": "Doe^Jane^ZZMARKNAME",
    "PatientID": "ZZMARKID-4711",
    "PatientBirthDate": "19230405",
    "InstitutionName": "ZZMARK General Hospital",
    "StudyDate": "20240229",
    "AccessionNumber": "ZZMARKACC99",
}


def dicom_bytes(
    stored: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    syntax: str = "explicit",
    preamble: bool = True,
    frames: int = 1,
    **elements,
) -> bytes:
    """A single- (or multi-) frame grey DX image; ``elements`` set header keywords (WindowCenter=…)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image (for presentation)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    ds.PatientSex, ds.PatientAge, ds.ViewPosition = "F", "067Y", "PA"
    ds.PixelSpacing = [0.143, 0.143]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    arr = np.asarray(stored)
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
        arr = np.stack([arr] * frames)
    dtype = np.uint16 if ds.BitsAllocated == 16 else np.uint8
    arr = arr.astype(dtype)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if syntax == "rle":
        ds.PixelData = arr.tobytes()
        ds.compress(RLELossless, arr, encoding_plugin="pydicom")
    elif syntax == "jpeg-lossless":
        import imagecodecs
        from pydicom.encaps import encapsulate

        # ITU T.81 process 14, predictor 1 (the JPEG Lossless SV1 transfer syntax), by libjpeg-turbo
        frame = bytes(imagecodecs.jpeg8_encode(arr, lossless=True, predictor=1, bitspersample=bits_stored))
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = JPEGLosslessSV1
    else:
        ds.PixelData = arr.tobytes()
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if not preamble:
        data = data[132:]  # no preamble, no "DICM": a raw data set as some old exports write
    return data


def structured_report() -> bytes:
    """A Basic Text SR: a DICOM object with no pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientName = IDENTIFYING["PatientName"]
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ramp(rows: int = 48, cols: int = 40, bits: int = 12, seed: int = 0) -> np.ndarray:
    """Stored values spanning the whole bit depth, with noise so every window cuts something."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 2**bits - 1, rows * cols).reshape(rows, cols)
    return np.clip(base + rng.normal(0, 2**bits / 50, base.shape), 0, 2**bits - 1).astype(np.uint16)
