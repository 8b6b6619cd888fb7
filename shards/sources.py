"""Where images come from: folders of PNGs or DICOMs, and NIH archives `images_0NN.tar.gz`.

A folder is scanned recursively for `*.png`, `*.dcm` and extensionless files that start like
DICOM (bytes 128…131 "DICM": PACS exports without names), so an extracted NIH download with its
`images/` sub-folder works as is. An archive is streamed member by member with
tarfile's `r|*` mode — never extracted, never seeked — so its members come in
archive order. An image's key is its file name without extension.

Tables of the other data sets (shards.datasets) name images by their path relative to the data
set's root, whose file names repeat (CheXpert's ``view1_frontal.jpg`` in every study): those are
looked up as ROOT/PATH under each folder given, never by a walk, and keyed by
:func:`shards.records.image_key` of the path.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxrbase.errors import CxrError
from shards.dicom import is_dicom_file
from shards.records import image_key

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass
class Sources:
    """Images found in folders (key → path) and archives to stream, in the order given."""

    files: dict[str, Path] = field(default_factory=dict)
    archives: list[Path] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)

    def describe(self) -> list[str]:
        """The source list recorded in the manifest (absolute paths)."""
        folders = sorted({str(p) for p in self.roots})
        return folders + [str(a) for a in self.archives]


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def scan_sources(paths: Sequence[str | Path], relative: Sequence[str] = (), walk: bool = True) -> Sources:
    """Index the folders' PNGs and check the archives exist; CxrError on a duplicate key.

    ``relative``: image paths relative to a folder (a data set's root), found as FOLDER/PATH;
    ``walk=False`` skips the recursive scan (a table that names every image by such a path).
    """
    sources = Sources()
    for raw in paths:
        path = Path(raw).resolve()
        if path.is_dir():
            sources.roots.append(path)
            for key, file in _relative_images(path, relative) if relative else ():
                if key in sources.files:
                    raise CxrError(
                        f"{file}: image also at {sources.files[key]} "
                        "— pass only one of the folders (each data set root once)"
                    )
                sources.files[key] = file
            for key, file in _walk_images(path) if walk else ():
                if key in sources.files:
                    raise CxrError(
                        f"{file}: duplicate image id {key!r}, also at {sources.files[key]} "
                        "— remove one copy or pass only one of the folders"
                    )
                sources.files[key] = file
        elif path.is_file() and is_archive(path):
            if path in sources.archives:
                raise CxrError(f"{path}: archive given twice — pass each archive once")
            sources.archives.append(path)
        elif path.exists():
            raise CxrError(
                f"{path}: not a folder of PNGs/DICOMs nor an archive ({', '.join(ARCHIVE_SUFFIXES)}) "
                "— pass a folder or NIH images_0NN.tar.gz files"
            )
        else:
            raise CxrError(f"{path}: image source does not exist — check the --images path")
    return sources


def _relative_images(root: Path, relative: Sequence[str]) -> Iterator[tuple[str, Path]]:
    """(key, ROOT/PATH) for each relative path that is a file under ``root``."""
    for rel in relative:
        file = root / rel
        if file.is_file():
            yield image_key(rel), file


def _walk_images(root: Path) -> Iterator[tuple[str, Path]]:
    """(key, path) of every PNG and DICOM file below ``root``, in a stable order."""
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(folder, name)
            if name.lower().endswith((".png", ".jpg", ".jpeg")):
                yield image_key(name), path
            elif is_dicom_file(path):  # .dcm, or a PACS export's own name (often a UID with dots)
                yield image_key(name), path


def iter_archive(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, str, bytes | None]]:
    """Stream (key, member name, bytes) for every PNG member; bytes is None unless want(key).

    Members not wanted are skipped without being read into memory (the gzip stream
    still has to be decompressed past them).
    """
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                name = member.name
                base = name.rsplit("/", 1)[-1]
                if not member.isreg() or not base.lower().endswith(".png") or base.startswith("."):
                    continue
                key = base[:-4]
                data = (tar.extractfile(member) or io.BytesIO()).read() if want(key) else None
                yield key, name, data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise CxrError(
            f"{path}: corrupt or truncated archive ({type(err).__name__}: {err}) "
            "— re-download it or check it with `gzip -t`"
        ) from None
