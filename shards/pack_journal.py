"""The resume journal of a pack: which shards are complete, and what they hold.

`OUT/.pack-journal.jsonl`: a first line with the settings of the packing, then one
line per completed shard (name, split, index, samples, bytes, sha256, keys,
converted, sizes). It is rewritten atomically after every shard. A re-run with the
same settings keeps the entries whose file still has the recorded size and sha256
and skips their images entirely.

For a URL ``--out`` (``s3://bucket/prefix``) the journal is an object beside the shards,
``prefix/.pack-journal.jsonl``, rewritten by one PUT after each shard's objects are up: a pack
killed on one machine resumes from any other. On resume the objects are listed once (sizes) and
each journaled shard is streamed once to check its sha256 and rebuild its expected index.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from cxrbase.errors import CxrError
from shards import remote
from shards.dali_index import group_members, index_text

JOURNAL_NAME = ".pack-journal.jsonl"


class HashingReader:
    """A read-only stream that hashes (sha256) and counts the bytes read through it, so one pass over
    a shard (a local file or a URL's object) gives its size, sha256 and tar members together."""

    def __init__(self, raw: Any):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self, chunk: int = 1 << 20) -> tuple[int, str]:
        """Read to the end; (bytes, sha256 hex) of the whole stream."""
        while self.read(chunk):
            pass
        return self.size, self.digest.hexdigest()


def scan_shard(loc: Any) -> tuple[int, str, str | None]:
    """(bytes, sha256, DALI index text — None when not a readable tar) of a shard, in one streamed pass."""
    with remote.open_read(loc) as fh:
        reader = HashingReader(fh)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                index = index_text(group_members(tar))
        except (tarfile.TarError, OSError):
            index = None
        size, sha = reader.drain()
    return size, sha, index


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks (``hashlib.file_digest`` needs Python 3.11;
    the package supports 3.10)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Journal:
    """Completed shards of one output folder (see module doc).

    ``prefix=True`` (master shards) keeps, per split, only the unbroken run of shards
    000000, 000001, … so shard numbering continues deterministically on resume.
    """

    def __init__(self, out: Path, settings: dict[str, Any], prefix: bool = True):
        self.path = remote.location(out) / JOURNAL_NAME
        self.settings = settings
        self.entries: list[dict[str, Any]] = []
        self._sizes = remote.list_sizes(self.path.parent)  # one listing (for a URL: no HEAD per shard)
        if JOURNAL_NAME in self._sizes:
            self._load(prefix)

    def _load(self, prefix: bool) -> None:
        lines = remote.read_text(self.path).splitlines()
        try:
            head, entries = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        except (IndexError, json.JSONDecodeError):
            raise CxrError(f"{self.path}: unreadable pack journal — delete it to re-pack from scratch") from None
        if head.get("settings") != self.settings:
            raise CxrError(
                f"{self.path}: this folder was packed with other settings ({head.get('settings')}) "
                "— use a new --out folder, or delete the folder to re-pack"
            )
        kept, broken = [], set()
        for entry in entries:
            split = entry["split"]
            position = sum(e["split"] == split for e in kept)
            if prefix and (split in broken or entry["name"] != f"{split}-{position:06d}.tar"):
                broken.add(split)
                continue
            if self._still_valid(entry):
                kept.append(entry)
            else:
                broken.add(split)
        self.entries = kept
        if len(kept) != len(entries):
            self._save()

    def _still_valid(self, entry: dict[str, Any]) -> bool:
        tar = self.path.parent / entry["name"]
        if self._sizes.get(entry["name"]) != entry["bytes"]:
            return False
        size, sha, expected = scan_shard(tar)
        if size != entry["bytes"] or sha != entry["sha256"] or expected is None:
            return False
        index = self.path.parent / entry["index"]
        if entry["index"] not in self._sizes or remote.read_text(index) != expected:
            remote.write_text(index, expected)
        return True

    def _save(self) -> None:
        lines = [json.dumps({"settings": self.settings})] + [json.dumps(e) for e in self.entries]
        remote.write_text(self.path, "\n".join(lines) + "\n")

    def add(self, entry: dict[str, Any]) -> None:
        """Record a completed shard (its tar and index are already under their final names)."""
        self.entries.append(entry)
        self._save()

    def done_keys(self) -> set[str]:
        return {key for entry in self.entries for key in entry["keys"]}

    def shard_count(self, split: str) -> int:
        return sum(e["split"] == split for e in self.entries)
