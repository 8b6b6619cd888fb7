"""The resume journal of a pack: which shards are complete, and what they hold.

`OUT/.pack-journal.jsonl`: a first line with the settings of the packing, then one
line per completed shard (name, split, index, samples, bytes, sha256, keys,
converted, sizes). Each shard APPENDS its line (one write, then fsync), so the journal
costs O(shards) bytes in all — rewriting it whole after every shard, as it once was, cost
O(shards² × keys per shard) (bench/RESULTS.md, "At scale" finding 6). A line cut short by a
kill is not a completed shard: it is dropped (and the file rewritten once) on resume. A re-run
with the same settings keeps the entries whose file still has the recorded size and sha256 and
skips their images entirely.

For a URL ``--out`` (``s3://bucket/prefix``) objects cannot be appended to, so the journal is a
prefix beside the shards, ``prefix/.pack-journal/``: ``settings.json`` and one small object per
completed shard (``00000000.json``, … numbered in the order written), PUT after that shard's
objects are up. Chosen over a bounded number of rewritten journal parts because every PUT then
stays O(one shard) and a resume needs one listing plus one small GET per shard — which it
already pays many times over by streaming each shard for its sha256. A pack killed on one
machine resumes from any other. On resume the objects are listed once (sizes) and each
journaled shard is streamed once to check its sha256 and rebuild its expected index. A
single-object ``prefix/.pack-journal.jsonl`` written by an older pack is read and converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from cxrbase.errors import CxrError
from shards import remote
from shards.dali_index import group_members, index_text

JOURNAL_NAME = ".pack-journal.jsonl"  # a local folder's journal (and an older pack's object)
JOURNAL_PREFIX = ".pack-journal"  # a URL's journal: one object per shard under it
SETTINGS_PART = "settings.json"


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
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]  # a read()-only stream
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
        folder = remote.location(out)
        self.url = remote.is_url(folder)
        self.path = folder / JOURNAL_NAME  # local: the appended file; URL: an older pack's single object
        self.parts = folder / JOURNAL_PREFIX  # URL: the per-shard objects
        self.settings = settings
        self.entries: list[dict[str, Any]] = []
        self._next_part = 0
        self._started = False  # the settings are written with the first entry (nothing on disk before)
        self._sizes = remote.list_sizes(folder)  # one listing (for a URL: no HEAD per shard)
        if self.url:
            part_sizes = remote.list_sizes(self.parts)
            if SETTINGS_PART in part_sizes:
                self._load(prefix, *self._read_parts(part_sizes), legacy=False)
            elif JOURNAL_NAME in self._sizes:
                self._load(prefix, *self._read_lines(remote.read_text(self.path)), legacy=True)
        elif JOURNAL_NAME in self._sizes:
            self._load(prefix, *self._read_lines(self.path.read_text()), legacy=False)

    def _read_lines(self, text: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        lines = text.split("\n")
        torn = lines.pop()  # "" after a complete last line; else a line a kill cut short (not done)
        try:
            head = json.loads(lines[0] if lines else torn)
            entries = [json.loads(line) for line in lines[1:]]
        except json.JSONDecodeError:
            raise CxrError(f"{self.path}: unreadable pack journal — delete it to re-pack from scratch") from None
        self._dirty = bool(torn) and bool(lines)
        return head, entries, []

    def _read_parts(self, sizes: dict[str, int]) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        names = sorted(n for n in sizes if n != SETTINGS_PART and n.endswith(".json"))
        try:
            head = json.loads(remote.read_text(self.parts / SETTINGS_PART))
            entries = [json.loads(remote.read_text(self.parts / name)) for name in names]
        except json.JSONDecodeError:
            raise CxrError(f"{self.parts}: unreadable pack journal — delete it to re-pack from scratch") from None
        self._next_part = 1 + max((int(n.removesuffix(".json")) for n in names), default=-1)
        self._dirty = False
        return head, entries, names

    def _load(
        self, prefix: bool, head: dict[str, Any], entries: list[dict[str, Any]], names: list[str], legacy: bool
    ) -> None:
        if head.get("settings") != self.settings:
            where = self.parts if self.url and not legacy else self.path
            raise CxrError(
                f"{where}: this folder was packed with other settings ({head.get('settings')}) "
                "— use a new --out folder, or delete the folder to re-pack"
            )
        kept: list[dict[str, Any]] = []
        kept_names: list[str] = []
        broken: set[str] = set()
        for i, entry in enumerate(entries):
            split = entry["split"]
            position = sum(e["split"] == split for e in kept)
            if prefix and (split in broken or entry["name"] != f"{split}-{position:06d}.tar"):
                broken.add(split)
                continue
            if self._still_valid(entry):
                kept.append(entry)
                kept_names.append(names[i] if names else "")
            else:
                broken.add(split)
        self.entries, self._started = kept, True
        if self.url:
            if legacy:  # an older pack's single object → one object per entry, then the old object goes
                remote.write_text(self.parts / SETTINGS_PART, json.dumps({"settings": self.settings}))
                for entry in kept:
                    self._put_part(entry)
                remote.remove(self.path)
            else:
                for name in sorted(set(names) - set(kept_names)):
                    remote.remove(self.parts / name)
        elif len(kept) != len(entries) or self._dirty:
            self._rewrite_local()

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

    def _rewrite_local(self) -> None:
        """The whole local journal, written atomically: only when it is created or entries were dropped."""
        lines = [json.dumps({"settings": self.settings})] + [json.dumps(e) for e in self.entries]
        remote.write_text(self.path, "\n".join(lines) + "\n")

    def _put_part(self, entry: dict[str, Any]) -> None:
        remote.write_text(self.parts / f"{self._next_part:08d}.json", json.dumps(entry))
        self._next_part += 1

    def add(self, entry: dict[str, Any]) -> None:
        """Record a completed shard (its tar and index are already under their final names): one appended,
        fsync'd line for a local folder, one small object for a URL."""
        if not self._started:
            if self.url:
                remote.write_text(self.parts / SETTINGS_PART, json.dumps({"settings": self.settings}))
            else:
                self._rewrite_local()
            self._started = True
        if self.url:
            self._put_part(entry)
        else:
            line = (json.dumps(entry) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                written = os.write(fd, line)  # one write: a kill leaves the line whole or cut (dropped on resume)
                if written != len(line):
                    raise CxrError(f"{self.path}: short write to the pack journal — check free disk space")
                os.fsync(fd)
            finally:
                os.close(fd)
        self.entries.append(entry)

    def done_keys(self) -> set[str]:
        return {key for entry in self.entries for key in entry["keys"]}

    def shard_count(self, split: str) -> int:
        return sum(e["split"] == split for e in self.entries)
