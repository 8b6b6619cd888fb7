"""cxr-predict's inputs (cxr/tools/predict.py): the files and folders it is given → the image files to
score and the files passed over with the reason, and one file → its 8-bit grey master."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrbase.errors import CxrError
from shards.dicom import is_dicom_file
from shards.image_codec import RASTER_SUFFIXES, BadImage, source_grey


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """The image files to score, in order, and the files passed over with their reasons."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def collect_inputs(paths: Sequence[str | Path]) -> Inputs:
    """Files and folders (walked recursively, sorted) → images to read; other files are listed as skipped."""
    found = Inputs()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                _add(found, file)
        elif path.is_file():
            _add(found, path)
        else:
            raise CxrError(f"{path}: no such file or folder — pass DICOM/PNG/JPEG files or folders of them")
    if not found.images and not found.skipped:
        raise CxrError(f"{', '.join(map(str, paths))}: no files found — pass DICOM/PNG/JPEG files or folders")
    return found


def _add(found: Inputs, file: Path) -> None:
    if file.suffix.lower() in RASTER_SUFFIXES or is_dicom_file(file):
        found.images.append(file)
    else:
        found.skipped.append((file, "not an image (neither DICOM nor PNG/JPEG)"))


def read_grey(path: Path) -> np.ndarray:
    """One file → the 8-bit grey master [H, W] pack would store for it (shards.image_codec.source_grey:
    DICOM through shards.dicom, PNG by pack's grey policy, JPEG as PIL's convert('L'))."""
    try:
        return source_grey(path.read_bytes(), str(path))
    except BadImage as err:
        raise CxrError(f"{path}: {err}") from None
    except OSError as err:
        raise CxrError(f"{path}: unreadable ({err.strerror or err})") from None
