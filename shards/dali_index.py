"""DALI webdataset index files (the format of DALI's `wds2idx`, version v1.2).

Layout, as `wds2idx` of DALI 2.4 writes it::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> <ext> <data offset> ... (one line per sample)

The offset is that of the member's data (its 512-byte tar header + 512), the
extension is the text after the first dot of the basename, and a sample is a run
of consecutive members sharing the basename. `fn.readers.webdataset(paths=...,
index_paths=...)` then opens shards without scanning them.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterable, Sequence

INDEX_VERSION = "v1.2"
# one member: (ext, data offset, size, name)
Member = tuple[str, int, int, str]


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
    samples: list[list[Member]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for info in tar:
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
