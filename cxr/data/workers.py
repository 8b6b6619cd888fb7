"""Loader worker processes and the job's stop signals (both back ends: the wds fork server, DALI's
spawned external-source workers)."""

from __future__ import annotations

from contextlib import contextmanager

STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")  # srun / scancel --signal / submitit: cxr.runs.distributed.StopFlag


@contextmanager
def stop_signals_blocked():
    """Start worker processes inside this block: they inherit the job's stop signals blocked.

    srun, `scancel --signal` and submitit signal every process of the job; a loader worker
    with the default action would die of SIGUSR1 / SIGTERM and crash the loader before the
    training process saves. A signal mask survives fork and exec (spawn), so the wds fork
    server, DALI's spawned source workers and multiprocessing's resource tracker leave the
    stop to the main process, which ends them itself. Blocked, not ignored, here: a signal
    that arrives meanwhile reaches the main process's handler when the mask is restored.
    """
    import signal

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {getattr(signal, name) for name in STOP_SIGNALS})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
