"""One exclusive lock per output folder that says who holds it: a training's run dir
(``RUN/.train.lock``, cxr.runs.run_lock), a pack's ``--out`` (``OUT/.pack.lock``) and an
evaluation's ``--out`` (``.OUT.lock`` beside it, since the report folder itself is replaced).

The holder takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file before it writes, and
holds it until it ends; the file says who holds it (``pid host``), which a refused start
names. The kernel drops a flock when its holder dies, so a file left behind by a killed
process never blocks: the next start takes it over and :attr:`FolderLock.stale` says so
(the caller logs it). On a clean exit the file is emptied before the lock is released.
flock works across the clients of NFSv4 and Lustre (mounted with ``flock``); on a
filesystem without lock support the start fails with a message saying so.

Hand-written (a dozen lines around fcntl) because the alternatives (``filelock``,
``fasteners``) do not store and report the holder, which the error must name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from cxrbase.errors import CxrError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(text: str) -> tuple[int | None, str | None]:
    parts = text.split()
    if len(parts) >= 2 and parts[0].isdigit():
        return int(parts[0]), parts[1]
    return None, None


class FolderLock:
    """``with FolderLock(folder, lock_path, busy=..., unwritable=...):`` — or :meth:`acquire` / :meth:`release`.

    ``busy``: the refusal after ``f"{folder}: "``, with ``{who}`` for the holder
    ("pid N on HOST"); ``unwritable``: the error when the lock file cannot be created, with
    ``{strerror}``, after ``f"{file}: "`` (None: the OSError itself, which cxrbase.errors.cli_entry
    reports in one line naming the file).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        lock_path: str | os.PathLike,
        *,
        busy: str = "another process ({who}) is writing to this folder — wait for it or use another one",
        unwritable: str | None = "cannot create the lock file ({strerror}) — choose a writable folder",
    ):
        self.folder, self.path = Path(folder), Path(lock_path)
        self.busy, self.unwritable = busy, unwritable
        self.fd: int | None = None
        self.stale: str | None = None  # a warning to log when a dead holder's file was taken over

    def acquire(self) -> FolderLock:
        """Take the lock or raise CxrError naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if self.unwritable is None:  # the CLI's one line for a full / read-only / forbidden output
                err.filename = err.filename or str(self.path)
                raise
            raise CxrError(f"{err.filename or self.path}: " + self.unwritable.format(strerror=err.strerror)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            text = os.pread(fd, 256, 0).decode(errors="replace")
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CxrError(
                    f"{self.path}: cannot lock {self.folder} ({err.strerror}) — the filesystem must "
                    f"support flock (NFSv4, Lustre with -o flock), or use another folder"
                ) from None
            pid, host = _holder(text)
            who = f"pid {pid} on {host}" if pid is not None else "a process that is starting up"
            raise CxrError(f"{self.folder}: " + self.busy.format(who=who)) from None
        pid, host = _holder(os.pread(fd, 256, 0).decode(errors="replace"))
        if pid is not None and pid != os.getpid():
            here = socket.gethostname()
            dead = host == here and not _alive(pid)
            self.stale = f"{self.path}: taking over the lock of pid {pid} on {host}, " + (
                "which is no longer running" if dead else "which ended without a clean exit"
            )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        """Empty the file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass  # a read-only or full filesystem: the kernel lock still goes with the close
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
