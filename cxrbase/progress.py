"""The one progress bar of cxr: tqdm on a terminal, plain lines in a log file.

Every progress bar of the project (pack, verify, synth, training epochs, inference, ...) is made
by :func:`progress`. On a terminal it is tqdm as usual. When the stream is not a terminal (a Slurm
``.out`` file, ``2> log``, a pipe), tqdm would write every refresh into the file with carriage
returns (thousands of fragments per epoch); there it writes one ordinary line every
``CXR_PROGRESS_PCT`` percent (default 10) or ``CXR_PROGRESS_S`` seconds (default 60), whichever
comes first, and a last line at the end, each formatted by tqdm's own ``format_meter`` (the same
count, rate and ETA as the bar). ``CXR_PROGRESS=bar`` / ``lines`` forces either form.
tqdm itself has no line mode (its ``mininterval`` only thins the carriage-return refreshes), hence
this small class.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    file: TextIO | None = None,
    initial: float = 0,
    **tqdm_kwargs: Any,
):
    """A tqdm bar on a terminal; :class:`LineProgress` (same methods used here) otherwise."""
    stream = file if file is not None else sys.stderr
    mode = os.environ.get("CXR_PROGRESS", "auto")
    if mode == "bar" or (mode != "lines" and is_terminal(stream)):
        from tqdm import tqdm

        return tqdm(
            iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, initial=initial, **tqdm_kwargs
        )
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, initial=initial)


class LineProgress:
    """Progress as plain lines: ``desc: 40%|... 400/1000 [00:10<00:15, 40.0img/s, loss=0.3]``."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        file: TextIO | None = None,
        initial: float = 0,
    ):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable, self.total, self.desc, self.unit, self.disable = iterable, total, desc, unit, disable
        self.file = file if file is not None else sys.stderr
        self.n = self.initial = initial
        self.every_pct = _env_float("CXR_PROGRESS_PCT", 10.0)
        self.every_s = _env_float("CXR_PROGRESS_S", 60.0)
        self.postfix = ""
        self.start = self._last_t = time.monotonic()
        self._last_n = initial
        self._closed = False

    # -- tqdm's interface, as far as cxr uses it
    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = time.monotonic()
        step = self.every_pct / 100 * self.total if self.total else None
        if (step and self.n - self._last_n >= step) or now - self._last_t >= self.every_s:
            self._write(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in items.items()))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, s: str) -> None:
        print(s, file=self.file, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n != self._last_n:
            self._write(time.monotonic())

    def line(self, now: float | None = None) -> str:
        from tqdm import tqdm

        elapsed = (time.monotonic() if now is None else now) - self.start
        done = self.n - self.initial
        return tqdm.format_meter(
            self.n,
            self.total,
            elapsed,
            ncols=0,
            prefix=self.desc,
            unit=self.unit,
            rate=done / elapsed if elapsed > 0 and done else None,
            postfix=self.postfix or None,
            initial=self.initial,
        )

    def _write(self, now: float) -> None:
        self._last_t, self._last_n = now, self.n
        print(self.line(now), file=self.file, flush=True)
