"""An exclusive lock on a run directory, so that two trainings never share one.

Rank 0 takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``RUN/.train.lock`` before anything is
written to the run dir and holds it until the run ends; the file says who holds it
(``pid host``). The kernel drops a flock when its holder dies, so a file left behind by a
killed training never blocks: the next start takes it and warns that it replaces a stale
holder. On a clean exit the file is emptied before the lock is released. flock works
across the clients of NFSv4 and Lustre (mounted with ``flock``); on a filesystem
without lock support the start fails with a message saying so.

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

LOCK_NAME = ".train.lock"


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


class RunLock:
    """``with RunLock(run_dir):`` — or :meth:`acquire` / :meth:`release`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.stale: str | None = None  # a warning to log when a dead holder's file was taken over

    def acquire(self) -> "RunLock":
        """Take the lock or raise CxrError naming the holder."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CxrError(f"{err.filename or self.path}: cannot write the run dir ({err.strerror}) — a training "
                           f"needs a writable checkpoint.run_dir; free space, fix its permissions or choose "
                           f"another") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            text = os.pread(fd, 256, 0).decode(errors="replace")
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CxrError(f"{self.path}: cannot lock the run dir ({err.strerror}) — the filesystem must "
                               f"support flock (NFSv4, Lustre with -o flock), or use another checkpoint.run_dir") from None
            pid, host = _holder(text)
            who = f"pid {pid} on {host}" if pid is not None else "a process that is starting up"
            raise CxrError(f"{self.run_dir}: another training ({who}) is using this run dir — wait for it "
                           f"or use another checkpoint.run_dir") from None
        pid, host = _holder(os.pread(fd, 256, 0).decode(errors="replace"))
        if pid is not None and pid != os.getpid():
            here = socket.gethostname()
            dead = host == here and not _alive(pid)
            self.stale = (f"{self.path}: taking over the lock of pid {pid} on {host}, "
                          + ("which is no longer running" if dead else "which ended without a clean exit"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
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

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
