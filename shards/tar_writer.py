"""Deterministic tar writing for shards: fixed headers, running sha256, DALI offsets.

Every header carries mtime 0, mode 0644, uid/gid 0 and no user names, so the same
samples always give the same bytes — which is what lets an interrupted pack resume
to the same sha256 per shard as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import tarfile
from typing import IO

from shards.dali_index import Member, split_name

BLOCK = 512
_ZEROS = bytes(2 * BLOCK)


def member_bytes(size: int) -> int:
    """Bytes a member of ``size`` data bytes takes in a tar: header + data padded to 512."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def end_bytes() -> int:
    """Bytes of the end-of-archive marker (two zero blocks)."""
    return 2 * BLOCK


# USTAR header of a regular file with mode 0644, uid/gid 0, mtime 0 — the bytes
# tarfile.TarInfo.tobuf(USTAR_FORMAT) gives, built directly (tobuf costs ~70 µs)
_TEMPLATE = bytearray(BLOCK)
_TEMPLATE[100:124] = b"0000644\x000000000\x000000000\x00"
_TEMPLATE[136:148] = b"00000000000\x00"
_TEMPLATE[156:157] = tarfile.REGTYPE
_TEMPLATE[257:265] = tarfile.POSIX_MAGIC


def _header(name: str, size: int) -> bytes:
    raw = name.encode("ascii")
    if len(raw) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} ({size} bytes) does not fit a plain USTAR header")
    header = bytearray(_TEMPLATE)
    header[: len(raw)] = raw
    header[124:136] = b"%011o\x00" % size
    header[148:156] = b"        "
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


class TarStream:
    """Append members to an open binary file, hashing what is written.

    ``members`` collects (ext, data offset, size, name) for the DALI index.
    """

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.offset = 0
        self.sha = hashlib.sha256()
        self.members: list[Member] = []

    def _write(self, data: bytes) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.offset += len(data)

    def add(self, name: str, data: bytes) -> None:
        """Write one regular-file member."""
        self._write(_header(name, len(data)))
        self.members.append((split_name(name)[1], self.offset, len(data), name))
        self._write(data)
        pad = -len(data) % BLOCK
        if pad:
            self._write(_ZEROS[:pad])

    def finish(self) -> str:
        """Write the end-of-archive marker; return the hex sha256 of the whole file."""
        self._write(_ZEROS)
        return self.sha.hexdigest()
