"""Process pools of the shards tool whose workers exit when the parent process dies.

A `kill -9` (or an OOM kill) of `pack`/`verify` would otherwise leave its spawn
workers idle forever, re-parented to init. On Linux each worker asks the kernel for
SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``, through ctypes: no
dependency); elsewhere, or if that call fails, a daemon thread polls the parent pid.
The kernel sends that signal when the *thread* that started the worker ends; the
pools here start their workers from the main thread (on submit), so it means the
process.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_POLL_S = 1.0


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A spawn ProcessPoolExecutor of ``workers`` processes that die with this process."""
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent, initargs=(os.getpid(),)
    )


def die_with_parent(parent: int) -> None:
    """Pool initializer: make this worker exit as soon as process ``parent`` is gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:  # died before the signal was armed
                os._exit(1)
            return
    threading.Thread(target=_watch, args=(parent,), name="parent-watchdog", daemon=True).start()


def _watch(parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(_POLL_S):  # a timed poll of a pid has no event to wait on
        if os.getppid() != parent:
            os._exit(1)
