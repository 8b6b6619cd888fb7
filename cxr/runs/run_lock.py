"""An exclusive lock on a run directory, so that two trainings never share one.

Rank 0 takes ``RUN/.train.lock`` (a :class:`cxrbase.lock.FolderLock`, the lock that pack and
evaluation take on their outputs too) before anything is written to the run dir and holds
it until the run ends; the file says who holds it (``pid host``). A file left behind by a
killed training never blocks: the next start takes it over and warns.
"""

from __future__ import annotations

from pathlib import Path

from cxrbase.lock import FolderLock

LOCK_NAME = ".train.lock"


class RunLock(FolderLock):
    """``with RunLock(run_dir):`` — or :meth:`acquire` / :meth:`release`."""

    def __init__(self, run_dir: str | Path):
        super().__init__(
            run_dir,
            Path(run_dir) / LOCK_NAME,
            busy="another training ({who}) is using this run dir — wait for it or use another checkpoint.run_dir",
            unwritable="cannot write the run dir ({strerror}) — a training needs a writable checkpoint.run_dir; "
            "free space, fix its permissions or choose another",
        )
        self.run_dir = Path(run_dir)
