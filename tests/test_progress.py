"""cxrbase.progress: tqdm on a terminal, plain lines (no carriage returns) in a log file."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from helpers import tiny_dataset

from cxrbase.progress import LineProgress, progress

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

ROOT = Path(__file__).resolve().parents[1]


def test_lines_every_ten_percent_and_a_last_line(monkeypatch):
    monkeypatch.delenv("CXR_PROGRESS_PCT", raising=False)
    monkeypatch.setenv("CXR_PROGRESS_S", "3600")
    out = io.StringIO()  # not a terminal
    bar = progress(total=1000, desc="work", unit="img", file=out, mininterval=0.5)
    assert isinstance(bar, LineProgress)
    with bar:
        for _ in range(1000):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [ln.split("|")[0].split()[1] for ln in lines] == [f"{p}%" for p in range(10, 101, 10)]
    assert lines[-1].startswith("work: 100% 1000/1000 [")


def test_seconds_bound_and_iteration(monkeypatch):
    monkeypatch.setenv("CXR_PROGRESS_S", "0")  # every update is due
    out = io.StringIO()
    assert list(progress(range(3), desc="it", file=out)) == [0, 1, 2]
    assert [ln.split()[2] for ln in out.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]


def _pack_cmd(tmp_path: Path) -> list[str]:

    table, folder = tiny_dataset(tmp_path, n=30, size=32)
    table.to_csv(tmp_path / "splits.csv", index=False)
    return [
        sys.executable,
        "-m",
        "shards",
        "pack",
        "--splits",
        str(tmp_path / "splits.csv"),
        "--images",
        str(folder),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
    ]


def test_pack_into_a_log_file_writes_lines_and_on_a_terminal_a_bar(tmp_path):
    """`cxr-shards pack 2> log`: plain lines, no carriage return; on a pseudo-terminal: tqdm's bar."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CXR_PROGRESS_S": "3600"}
    env.pop("CXR_PROGRESS", None)
    cmd = _pack_cmd(tmp_path)
    with open(tmp_path / "log", "wb") as log:
        subprocess.run(cmd, cwd=tmp_path, env=env, stderr=log, stdout=subprocess.DEVNULL, check=True, timeout=300)
    text = (tmp_path / "log").read_text()
    assert "\r" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("pack: ") and "%" in ln]
    assert len(lines) == 10 and lines[-1].startswith("pack: 100% 30/30 ["), text
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.run(
        cmd[:-3] + [str(tmp_path / "again"), "--workers", "1"],
        cwd=tmp_path,
        env=env,
        stderr=follower,
        stdout=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )
    os.close(follower)
    seen = b""
    try:
        while chunk := os.read(leader, 65536):
            seen += chunk
    except OSError:  # EIO: the terminal's other end is closed
        pass
    os.close(leader)
    assert proc.returncode == 0 and b"\r" in seen and b"pack: 100%" in seen
