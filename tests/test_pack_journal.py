"""shards.pack_journal: the journal grows by one line (or one object) per shard — bytes written over
N shards are linear in N, against a hand formula — and a resume still checks size and sha256.

Kill-and-resume through the `pack` command is tested in tests/test_pack.py (local folder) and
tests/test_s3.py (bucket); here the journal itself, with fsspec's in-memory file system for the URL
case."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid

import pytest

from shards import remote
from shards.pack_journal import JOURNAL_NAME, Journal

SETTINGS = {"codec": "png", "resolution": None, "quality": 95}
N = 60


def entry(i: int) -> dict:
    """A journal entry of fixed width (the key names have the same length for every i)."""
    return {
        "name": f"train-{i:06d}.tar",
        "split": "train",
        "index": f"train-{i:06d}.idx",
        "samples": 100,
        "bytes": 1_000_000 + i,
        "sha256": f"{i:064x}",
        "keys": [f"{i:06d}_{k:03d}" for k in range(100)],
        "converted": [],
        "sizes": {},
    }


def expected_bytes(n: int) -> tuple[int, int]:
    """(settings line, one entry line) in bytes, written out: json.dumps with its default separators."""
    header = len('{"settings": {"codec": "png", "resolution": null, "quality": 95}}\n')
    keys = ", ".join(['"000000_000"'] * 100)  # 12 characters per key, 2 per separator
    line = (
        '{"name": "train-000000.tar", "split": "train", "index": "train-000000.idx", "samples": 100, '
        f'"bytes": 1000000, "sha256": "{"0" * 64}", "keys": [{keys}], "converted": [], "sizes": {{}}}}\n'
    )
    return header, len(line)


def test_local_journal_writes_each_shard_once(tmp_path, monkeypatch):
    written = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: written.append(len(data)) or real_write(fd, data))
    puts = []
    real_bytes = remote.write_bytes
    monkeypatch.setattr(remote, "write_bytes", lambda loc, data: puts.append(len(data)) or real_bytes(loc, data))
    journal = Journal(tmp_path, SETTINGS)
    for i in range(N):
        journal.add(entry(i))
    header, line = expected_bytes(N)
    # the settings line once (atomic write of the new file), then one appended line per shard:
    # header + N·line = 66 + 60·1,628 = 97,746 bytes, where rewriting the journal whole after every
    # shard wrote Σ_k (header + k·line) = 60·66 + 1,628·60·61/2 = 2,983,200
    assert puts == [header]
    assert written == [line] * N
    assert header + sum(written) == header + N * line == (tmp_path / JOURNAL_NAME).stat().st_size
    assert header + N * line < (N * header + line * N * (N + 1) // 2) / 25  # vs the old rewrite: ~30× less


def test_url_journal_puts_one_small_object_per_shard(monkeypatch):
    url = f"memory://journal-{uuid.uuid4().hex}/out"
    puts = []
    real_bytes = remote.write_bytes
    monkeypatch.setattr(remote, "write_bytes", lambda loc, data: puts.append(len(data)) or real_bytes(loc, data))
    journal = Journal(url, SETTINGS)
    for i in range(N):
        journal.add(entry(i))
    header, line = expected_bytes(N)
    assert puts == [header - 1] + [line - 1] * N  # the objects carry no trailing newline
    listed = remote.list_sizes(f"{url}/.pack-journal")
    assert sorted(listed) == sorted(["settings.json"] + [f"{i:08d}.json" for i in range(N)])


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _shard(folder, i: int) -> dict:
    data = _tar({f"k{i}.png": bytes([i]) * 50, f"k{i}.json": b"{}"})
    name = f"train-{i:06d}.tar"
    remote.write_bytes(remote.location(folder) / name, data)
    return {
        "name": name,
        "split": "train",
        "index": f"train-{i:06d}.idx",
        "samples": 1,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "keys": [f"k{i}"],
    }


@pytest.mark.parametrize("where", ["local", "url"])
def test_resume_keeps_checked_shards_and_drops_a_torn_or_altered_one(tmp_path, where):
    folder = tmp_path if where == "local" else f"memory://journal-{uuid.uuid4().hex}/out"
    journal = Journal(folder, SETTINGS)
    entries = [_shard(folder, i) for i in range(3)]
    for e in entries:
        journal.add(e)
    if where == "local":  # a kill in the middle of the 4th shard's line
        with open(tmp_path / JOURNAL_NAME, "a") as fh:
            fh.write('{"name": "train-000003.tar", "spl')
    resumed = Journal(folder, SETTINGS)
    assert [e["name"] for e in resumed.entries] == [e["name"] for e in entries]
    assert resumed.done_keys() == {"k0", "k1", "k2"}
    if where == "local":  # the torn line is gone: the file is whole lines again
        assert (tmp_path / JOURNAL_NAME).read_text().endswith("}\n")
    # a shard whose bytes changed (same size) fails its sha256: it and every later shard of its split go
    loc = remote.location(folder) / "train-000001.tar"
    data = bytearray(remote.read_bytes(loc))
    data[520] ^= 1  # inside the first member's bytes
    remote.write_bytes(loc, bytes(data))
    again = Journal(folder, SETTINGS)
    assert [e["name"] for e in again.entries] == ["train-000000.tar"]
    again.add(_shard(folder, 1))  # numbering continues after the kept prefix
    final = Journal(folder, SETTINGS)
    assert [e["name"] for e in final.entries] == ["train-000000.tar", "train-000001.tar"]
    if where == "url":
        assert sorted(remote.list_sizes(f"{folder}/.pack-journal")) == [
            "00000000.json",
            "00000003.json",
            "settings.json",
        ]


def test_an_older_single_object_journal_in_a_bucket_is_read_and_converted():
    url = f"memory://journal-{uuid.uuid4().hex}/out"
    entries = [_shard(url, i) for i in range(2)]
    lines = [json.dumps({"settings": SETTINGS})] + [json.dumps(e) for e in entries]
    remote.write_text(f"{url}/{JOURNAL_NAME}", "\n".join(lines) + "\n")
    journal = Journal(url, SETTINGS)
    assert [e["name"] for e in journal.entries] == ["train-000000.tar", "train-000001.tar"]
    assert JOURNAL_NAME not in remote.list_sizes(url)
    assert sorted(remote.list_sizes(f"{url}/.pack-journal")) == ["00000000.json", "00000001.json", "settings.json"]
    assert [e["name"] for e in Journal(url, SETTINGS).entries] == ["train-000000.tar", "train-000001.tar"]
