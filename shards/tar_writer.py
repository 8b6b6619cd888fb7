"""Deterministic tar writing for shards: fixed headers, running sha256, DALI offsets.

Every header carries mtime 0, mode 0644, uid/gid 0 and no user names, so the same
samples always give the same bytes — which is what lets an interrupted pack resume
to the same sha256 per shard as an uninterrupted one.

The sha256 of a shard is one sequential stream (~1 GB/s on one core), the slowest
step of a passthrough pack; it runs on its own thread (hashlib releases the GIL on
large buffers) so it overlaps the writes and the next images' reads and CRC checks.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import tarfile
import threading
from collections.abc import Sequence
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


# members at least this big are written and hashed from their own buffer (no copy);
# smaller ones are joined with the headers and padding around them
_BIG = 64 * 1024


class _Hasher:
    """sha256 of a byte stream, updated on a background thread in submission order."""

    def __init__(self, depth: int = 16):
        self.sha = hashlib.sha256()
        self.error: BaseException | None = None
        # bounded: at most ``depth`` batches of buffers are held alive waiting to be hashed
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="tar-sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (buffers := self.queue.get()) is not None:
            if self.error is None:
                try:
                    for buf in buffers:
                        self.sha.update(buf)
                except BaseException as err:  # keep draining so update() never blocks
                    self.error = err

    def update(self, buffers: Sequence[bytes | memoryview]) -> None:
        self.queue.put(buffers)

    def close(self) -> None:
        """Stop the thread once everything queued is hashed."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self.error is not None:
            raise self.error
        return self.sha.hexdigest()


class TarStream:
    """Append members to an open binary file, hashing what is written.

    ``members`` collects (ext, data offset, size, name) for the DALI index. Call
    :meth:`finish` (or :meth:`close` when abandoning the file) to stop the hash thread.
    """

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.offset = 0
        self.members: list[Member] = []
        self._hasher = _Hasher()
        try:
            fh.flush()
            self._fd: int | None = fh.fileno()
        except (AttributeError, io.UnsupportedOperation):
            self._fd = None

    def _write(self, buffers: list[bytes | memoryview]) -> None:
        if self._fd is None:
            for buf in buffers:
                self.fh.write(buf)
        else:
            _writev_all(self._fd, buffers)
        self._hasher.update(buffers)
        self.offset += sum(len(buf) for buf in buffers)

    def add(self, name: str, data: bytes) -> None:
        """Write one regular-file member."""
        self.add_sample([(name, data)])

    def add_sample(self, members: Sequence[tuple[str, bytes]]) -> None:
        """Write several regular-file members with one system call; large data is not copied."""
        buffers: list[bytes | memoryview] = []
        small = bytearray()
        offset = self.offset
        for name, data in members:
            size = len(data)
            small += _header(name, size)
            self.members.append((split_name(name)[1], offset + BLOCK, size, name))
            if size >= _BIG:
                buffers += [bytes(small), data]
                small = bytearray()
            else:
                small += data
            small += _ZEROS[: -size % BLOCK]
            offset += member_bytes(size)
        if small:
            buffers.append(bytes(small))
        self._write(buffers)

    def finish(self) -> str:
        """Write the end-of-archive marker; return the hex sha256 of the whole file."""
        self._write([_ZEROS])
        return self._hasher.hexdigest()

    def close(self) -> None:
        """Stop hashing without a result (the file is being discarded)."""
        self._hasher.close()


def _writev_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    """os.writev, continuing after a short write until every byte is written."""
    written = os.writev(fd, buffers)
    total = sum(len(buf) for buf in buffers)
    if written == total:
        return
    rest = memoryview(b"".join(buffers))[written:]  # rare path: no need to avoid the copy
    while rest:
        rest = rest[os.write(fd, rest) :]
