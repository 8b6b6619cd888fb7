"""DALI webdataset index files (the format of DALI's `wds2idx`, version v1.2).

Layout, as `wds2idx` of DALI 2.4 writes it::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> <ext> <data offset> ... (one line per sample)

The offset is that of the member's data (its 512-byte tar header + 512), the
extension is the text after the first dot of the basename, and a sample is a run
of consecutive members sharing the basename. `fn.readers.webdataset(paths=...,
index_paths=...)` then opens shards without scanning them.

This module owns the ``.idx`` files of a shards folder: pack and derive write them
(:func:`write_index`), verify compares them with :func:`index_for_tar`, and the loaders
read them (:func:`read_index`), check them against their tar (:func:`index_mismatch`)
and fall back to :func:`scan_tar` when one is absent or stale.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError

INDEX_VERSION = "v1.2"
# one member: (ext, data offset, size, name)
Member = tuple[str, int, int, str]
# what a reader gets per sample: (key, {ext: (data offset, size)}), in tar order
Sample = tuple[str, dict[str, tuple[int, int]]]


def split_name(name: str) -> tuple[str, str]:
    """Split a member name into (basename, extension) at the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def index_text(samples: Sequence[Sequence[Member]]) -> str:
    """Render the index of a shard whose samples hold the given members, in tar order."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members))
    return "\n".join(lines) + "\n"


def members_from_tar(tar_path: str | Path) -> list[list[Member]]:
    """Read a tar's headers (no data) and group its regular files into samples."""
    with tarfile.open(tar_path, "r:") as tar:
        return group_members(tar)


def group_members(infos: Iterable[tarfile.TarInfo], each: Callable[[tarfile.TarInfo], None] | None = None):
    """Group the regular files among ``infos`` (tar order) into samples of Members; ``each`` is
    called on every member as it passes (to read its data from a stream)."""
    samples: list[list[Member]] = []
    last = None
    for info in infos:
        if each is not None:
            each(info)
        if not info.isreg():
            continue
        base, ext = split_name(info.name)
        if not base or base.endswith("/"):
            continue
        if base != last:
            samples.append([])
            last = base
        samples[-1].append((ext, info.offset_data, info.size, info.name))
    return samples


def index_for_tar(tar_path: str | Path) -> str:
    """The index text `wds2idx` would write for ``tar_path``."""
    return index_text(members_from_tar(tar_path))


def group_samples(members: Iterable[Member]) -> list[list[Member]]:
    """Group consecutive members sharing a basename into samples."""
    samples: list[list[Member]] = []
    last = None
    for member in members:
        base, _ = split_name(member[3])
        if base != last:
            samples.append([])
            last = base
        samples[-1].append(member)
    return samples


def write_index(path: str | Path, members: Iterable[Member]) -> Path:
    """Write the index of a shard whose members (in tar order) are ``members``, atomically."""
    atomic_write_text(path, index_text(group_samples(members)))
    return Path(path)


def read_index(idx: str | Path) -> list[Sample]:
    """Parse an index file into [(key, {ext: (offset, size)})]; CxrError naming it if malformed."""
    from shards import remote  # noqa: PLC0415 — remote imports cxrbase only; kept out of import time

    idx = remote.location(idx)
    lines = remote.read_text(idx).splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1."):
        raise CxrError(f"{idx}: not a DALI webdataset index — delete it (it is rebuilt by a scan) or re-pack")
    samples = []
    for line in lines[1:]:
        tok = line.split()
        if not tok:
            continue
        if len(tok) % 4:
            raise CxrError(f"{idx}: expected 'ext offset size name' groups (index v1.2) — delete the .idx or re-pack")
        members = {tok[j]: (int(tok[j + 1]), int(tok[j + 2])) for j in range(0, len(tok), 4)}
        samples.append((Path(tok[3]).name.partition(".")[0], members))
    if len(samples) != int(head[1]):
        raise CxrError(f"{idx}: header says {head[1]} samples, found {len(samples)} — re-pack this shard")
    return samples


def scan_tar(tar: str | Path) -> list[Sample]:
    """What :func:`read_index` returns for the index :func:`index_for_tar` would write, from a
    scan of the tar's headers (for a shard whose index is absent or does not match it)."""
    from shards import remote  # noqa: PLC0415

    try:
        if remote.is_url(tar):  # a header scan of an object streams it whole (once)
            with remote.open_read(tar) as fh, tarfile.open(fileobj=fh, mode="r|") as stream:
                samples = group_members(stream)
        else:
            samples = members_from_tar(tar)
    except tarfile.TarError as err:
        raise CxrError(f"{tar}: not a readable tar ({err}) — re-pack this shard") from err
    return [
        (Path(members[0][3]).name.partition(".")[0], {ext: (offset, size) for ext, offset, size, _ in members})
        for members in samples
    ]


def index_mismatch(tar: Path, samples: list[Sample]) -> str | None:
    """Cheap check of an index against its tar: every member of the first and last sample must
    sit right after a tar header with its name and size, and the last one be followed by the
    end-of-archive blocks. None when it matches, else what differs.

    Two samples' headers (a few preads per shard) catch an index shifted, truncated or
    belonging to another shard; a damaged middle is caught when that sample is read.
    Members past the end of a truncated tar are not index faults: reading them reports
    the samples as truncated.
    """
    from shards import remote  # noqa: PLC0415

    if not samples:
        return "the index lists no samples"
    reader = remote.RangeReader(tar)
    try:
        file_size = reader.size()
        for key, members in {0: samples[0], len(samples) - 1: samples[-1]}.values():
            for ext, (offset, size) in members.items():
                problem = header_mismatch(reader, f"{key}.{ext}", offset, size)
                if problem:
                    return problem
        end = max(o + -(-s // 512) * 512 for o, s in samples[-1][1].values())
        if end + 1024 <= file_size and reader.pread(1024, end) != bytes(1024):
            return f"more data after the last indexed sample (offset {end})"
    finally:
        reader.close()
    return None


def header_mismatch(fd: Any, name: str, offset: int, size: int) -> str | None:
    """What is wrong when the 512 bytes before ``offset`` are not the tar header of ``name``
    with ``size``; None when they are, or when the file ends before them (truncated tar).
    ``fd``: a descriptor, or a reader with ``pread(size, offset)`` (shards.remote.RangeReader)."""
    pread = (lambda n, at: os.pread(fd, n, at)) if isinstance(fd, int) else fd.pread
    header = pread(512, offset - 512) if offset >= 512 else b"x"
    if len(header) < 512 and offset >= 512:
        return None  # the tar is truncated: its samples are reported as such when read
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
        found_size = int(header[124:136].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        stored = found_size = -1
    if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # the header checksum (chksum field as spaces)
        return f"{name} at offset {offset}: no tar header before it (data instead)"
    found = Path(header[:100].rstrip(b"\0").decode("latin-1")).name
    if found != name or found_size != size:
        return f"{name} ({size} B) at offset {offset}: the tar has {found!r} ({found_size} B) there"
    return None
