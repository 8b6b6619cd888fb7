"""Atomic writes: a file (temp file beside the target, fsync, rename) or a whole folder (temp folder, renames)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Open a temp file next to ``path``; on clean exit fsync and rename over it.

    On an exception the temp file is removed and ``path`` is left untouched, so a
    reader never sees a partial file under the final name. ``fsync=False`` skips the
    fsync (still atomic for readers, but a power cut may leave an empty file): only for
    files that are a rebuildable hint rewritten often, such as the shard cache's index.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the final file the permissions open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)  # a failed write (ENOSPC …) names no file; the CLI reports this one
        raise


def _read_umask() -> int:
    # Read once at import: os.umask() can only be read by setting it, which races
    # with threads creating files.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``fsync``: see :func:`atomic_write`)."""
    with atomic_write(path, "w", fsync=fsync) as fh:
        fh.write(text)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files that a killed :func:`atomic_write` left in ``folder``; return how many.

    Only safe when no other writer is using the folder (callers hold its lock)."""
    stale = list(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; on clean exit it replaces ``path`` as a whole.

    For outputs made of several files (an evaluation report): a reader sees the old folder
    or the new one, never a mix (no file of an older report is left beside a newer one).
    On an exception the temp folder is removed and ``path`` is left as it was. The swap is
    two renames (old → ``.NAME.old-*``, temp → NAME) and then the old folder is deleted;
    a kill between them leaves ``.NAME.*`` folders that :func:`remove_stale_folders` clears.
    Callers hold the lock of ``path`` (cxrbase.lock) so two writers never swap at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700; give it the permissions mkdir would
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old)  # a directory onto an empty directory: allowed by rename(2)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)
        raise


def remove_stale_folders(path: str | os.PathLike) -> int:
    """Delete the ``.NAME.tmp-*`` / ``.NAME.old-*`` folders a killed :func:`atomic_folder` left
    beside ``path``; return how many. Only under the lock of ``path``."""
    path = Path(path)
    stale = [
        p for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*") for p in path.parent.glob(pattern) if p.is_dir()
    ]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return len(stale)
