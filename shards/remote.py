"""Shards folders named by URL (``s3://``, ``gs://``, ``https://``) or local path — the one URL layer.

Every reader and writer of a shards folder goes through here for I/O, so a URL works wherever a
folder does. The file systems are fsspec's (s3fs, gcsfs, HTTP), reached through
``fsspec.core.url_to_fs``; paths are ``upath.UPath`` for URLs (pathlib's ``/``, ``.name``,
``.parent``, ``.with_suffix`` over fsspec) and ``pathlib.Path`` for local folders, so path
arithmetic stays the same code. Credentials come only from each back end's standard provider
chain (for S3 botocore's: environment, ``AWS_PROFILE`` / ``~/.aws``, the instance role); this
module never takes, logs or stores one.

API (``loc`` is what :func:`location` returns, or a str/Path it is applied to):

- :func:`is_url`, :func:`location`;
- :func:`is_file`, :func:`read_bytes`, :func:`read_text`, :func:`open_read` (a sequential stream),
  :class:`RangeReader` (``pread(size, offset)``: one ranged GET per call on a URL);
- :func:`list_sizes` (``{name: bytes}`` of the files directly in a folder);
- :func:`put_file` / :func:`write_bytes` / :func:`write_text`: atomic — a local file via
  ``cxrbase.atomic``; an object by one upload (a single S3 PUT is atomic: the object appears whole
  or not at all; an interrupted multipart upload leaves no object either);
- :func:`errors`: a context that turns the back ends' exceptions (missing back end, bucket or
  object, rejected credentials) into one-line ``CxrError``s naming the URL and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cxrbase.atomic import atomic_write
from cxrbase.errors import CxrError

# fsspec protocol → the extra that installs its back end
_INSTALL = {
    "s3": "pip install 'cxr[s3]'",
    "s3a": "pip install 'cxr[s3]'",
    "gs": "pip install 'cxr[gcs]'",
    "gcs": "pip install 'cxr[gcs]'",
    "http": "pip install aiohttp",
    "https": "pip install aiohttp",
}
_CHUNK = 8 << 20  # 8 MiB per read of a stream


def is_url(path: Any) -> bool:
    """Whether ``path`` names a remote location (``scheme://…``, not ``file://``)."""
    text = str(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


def location(path: Any) -> Any:
    """``Path`` for a local folder or file, ``UPath`` for a URL (CxrError when its back end is missing)."""
    if not is_url(path):
        return Path(path)
    if hasattr(path, "fs") and hasattr(path, "path"):
        return path  # already a UPath
    with errors(path):
        from upath import UPath  # noqa: PLC0415 — only for URLs (the s3 / gcs extras)

        loc = UPath(str(path).rstrip("/"))
        loc.fs  # noqa: B018 — instantiates the back end: a missing one fails here, named
    return loc


def scheme(path: Any) -> str:
    return str(path).partition("://")[0].lower() if is_url(path) else "file"


@contextlib.contextmanager
def errors(url: Any, missing: str | None = None) -> Iterator[None]:
    """Turn a file system's exception about ``url`` into a one-line CxrError naming it and the fix.

    ``missing``: the fix to suggest when the object does not exist (default: check the URL)."""
    try:
        yield
    except CxrError:
        raise
    except ImportError as err:
        proto = scheme(url)
        how = _INSTALL.get(proto, "install the fsspec back end for it")
        raise CxrError(f"{url}: no file system for {proto}:// is installed ({err}) — {how}") from None
    except ValueError as err:
        if "Protocol not known" not in str(err) and "Unsupported filesystem" not in str(err):
            raise
        raise CxrError(
            f"{url}: unknown URL scheme {scheme(url)}:// — use s3://, gs://, https:// or a local path"
        ) from None
    except PermissionError:
        if not is_url(url):
            raise  # a local EACCES: the CLI boundary reports it (cxrbase.errors)
        raise _denied(url) from None
    except FileNotFoundError as err:
        if not is_url(url):
            raise
        text = str(err)
        if "bucket does not exist" in text or "NoSuchBucket" in text:
            bucket = str(url).partition("://")[2].partition("/")[0]
            raise CxrError(
                f"{url}: bucket {bucket!r} does not exist — create it (aws s3 mb s3://{bucket}) or fix the URL"
            ) from None
        raise CxrError(f"{url}: no such object — {missing or 'check the URL'}") from None
    except OSError as err:
        name = type(err).__name__
        if not is_url(url) or err.errno is not None:
            raise
        if str(err).startswith("Forbidden"):  # gcsfs says an HTTP 403 as OSError("Forbidden: path\nreason")
            raise _denied(url) from None
        what = " ".join(str(err).split())  # one line: a back end's message may hold the server's reply
        raise CxrError(f"{url}: {name} ({what}) — check the URL, the network and the credentials") from None
    except Exception as err:  # botocore's NoCredentialsError and kin are no OSError
        if type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError", "ClientError"):
            raise CxrError(
                f"{url}: {type(err).__name__} — give credentials the standard way (for S3: AWS_PROFILE, "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or the instance role)"
            ) from None
        raise


def _denied(url: Any) -> CxrError:
    return CxrError(
        f"{url}: access denied (the credentials were rejected or may not use this bucket) — set "
        "valid ones the standard way (for S3: AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        "or the instance role; for GCS: GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default "
        "login`, or the VM's service account) with read (and for pack, write) access to it"
    )


def _fs_path(loc: Any) -> tuple[Any, str]:
    loc = location(loc)
    return loc.fs, loc.path


def is_file(loc: Any) -> bool:
    loc = location(loc)
    if not is_url(loc):
        return loc.is_file()
    with errors(loc):
        if loc.fs.isfile(loc.path):
            return True
    list_sizes(loc.parent)  # a missing bucket (or rejected credentials) is said as such, not as a missing file
    return False


def read_bytes(loc: Any, missing: str | None = None) -> bytes:
    loc = location(loc)
    if not is_url(loc):
        return loc.read_bytes()
    with errors(loc, missing):
        return loc.fs.cat_file(loc.path)


def read_text(loc: Any, missing: str | None = None) -> str:
    return read_bytes(loc, missing).decode()


@contextlib.contextmanager
def open_read(loc: Any) -> Iterator[IO[bytes]]:
    """A binary stream of the whole file or object (read sequentially in 8 MiB blocks for a URL)."""
    loc = location(loc)
    if not is_url(loc):
        with open(loc, "rb") as fh:
            yield fh
        return
    with errors(loc), loc.fs.open(loc.path, "rb", block_size=_CHUNK, cache_type="readahead") as fh:
        yield fh


def list_sizes(folder: Any) -> dict[str, int]:
    """{file name: bytes} of the files directly in ``folder`` (empty when it does not exist)."""
    folder = location(folder)
    if not is_url(folder):
        if not folder.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    with errors(folder):
        try:
            entries = folder.fs.ls(folder.path, detail=True, refresh=True)
        except FileNotFoundError as err:
            if "bucket" in str(err).lower():
                raise
            return {}
    return {
        e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e.get("type") == "file"
    }


def put_file(local: str | os.PathLike, loc: Any) -> None:
    """Copy a finished local file to ``loc``: atomically (a temp file renamed, or one upload)."""
    loc = location(loc)
    if not is_url(loc):
        with open(local, "rb") as src, atomic_write(loc) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        return
    with errors(loc):
        loc.fs.put_file(str(local), loc.path)


def write_bytes(loc: Any, data: bytes) -> None:
    loc = location(loc)
    if not is_url(loc):
        with atomic_write(loc) as fh:
            fh.write(data)
        return
    with errors(loc):
        loc.fs.pipe_file(loc.path, data)


def write_text(loc: Any, text: str) -> None:
    write_bytes(loc, text.encode())


def remove(loc: Any) -> None:
    """Delete a file or object (nothing when it is already gone)."""
    loc = location(loc)
    if not is_url(loc):
        loc.unlink(missing_ok=True)
        return
    with errors(loc):
        try:
            loc.fs.rm_file(loc.path)
        except FileNotFoundError:
            pass


_WARNED: set[str] = set()


def _warn_no_ranges(loc: Any) -> None:
    host = str(loc).partition("://")[2].partition("/")[0]
    if host not in _WARNED:
        _WARNED.add(host)
        logging.getLogger("cxr.data").warning(
            "%s: the server ignores HTTP Range requests, so every sample read downloads its whole shard "
            "— serve the shards from a server that supports ranges (nginx, S3, any CDN) for speed",
            host,
        )


class RangeReader:
    """``pread(size, offset)`` on a local file (``os.pread``) or a URL (one ranged GET per call).

    Picklable (to DataLoader workers) and fork-safe: a local descriptor is reopened in a new process."""

    def __init__(self, loc: Any):
        self.loc = location(loc)
        self.url = is_url(self.loc)
        self._fd: int | None = None
        self._pid: int | None = None

    def pread(self, size: int, offset: int) -> bytes:
        if size <= 0:
            return b""
        if self.url:
            with errors(self.loc):
                fs = self.loc.fs
                try:
                    data = fs.cat_file(self.loc.path, start=offset, end=offset + size)
                    if len(data) > size:  # an HTTP server that ignores Range sent the whole file
                        _warn_no_ranges(self.loc)
                        data = data[offset : offset + size]
                    return data
                except OSError as err:  # a range past the end of the object: a short read, as os.pread
                    if "not satisfiable" in str(err).lower() or "InvalidRange" in str(err) or "416" in str(err):
                        return b""
                    raise
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.loc, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, size, offset)

    def size(self) -> int:
        if self.url:
            with errors(self.loc):
                return int(self.loc.fs.size(self.loc.path))
        return os.stat(self.loc).st_size

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        return {"loc": self.loc, "url": self.url, "_fd": None, "_pid": None}
