"""The resume journal of a pack: which shards are complete, and what they hold.

`OUT/.pack-journal.jsonl`: a first line with the settings of the packing, then one
line per completed shard (name, split, index, samples, bytes, sha256, keys,
converted, sizes). It is rewritten atomically after every shard. A re-run with the
same settings keeps the entries whose file still has the recorded size and sha256
and skips their images entirely.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError
from shards.dali_index import index_for_tar

JOURNAL_NAME = ".pack-journal.jsonl"


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
        self.path = Path(out) / JOURNAL_NAME
        self.settings = settings
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            self._load(prefix)

    def _load(self, prefix: bool) -> None:
        lines = self.path.read_text().splitlines()
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
        if not tar.is_file() or tar.stat().st_size != entry["bytes"] or file_sha256(tar) != entry["sha256"]:
            return False
        index = self.path.parent / entry["index"]
        expected = index_for_tar(tar)
        if not index.is_file() or index.read_text() != expected:
            atomic_write_text(index, expected)
        return True

    def _save(self) -> None:
        lines = [json.dumps({"settings": self.settings})] + [json.dumps(e) for e in self.entries]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def add(self, entry: dict[str, Any]) -> None:
        """Record a completed shard (its tar and index are already under their final names)."""
        self.entries.append(entry)
        self._save()

    def done_keys(self) -> set[str]:
        return {key for entry in self.entries for key in entry["keys"]}

    def shard_count(self, split: str) -> int:
        return sum(e["split"] == split for e in self.entries)
