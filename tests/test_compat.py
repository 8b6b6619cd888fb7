"""The supported floor of Python (3.10): no 3.11-only standard-library call on the pack path."""

from __future__ import annotations

import hashlib

from shards import records
from shards.pack_journal import file_sha256


def test_file_sha256_works_without_hashlib_file_digest(tmp_path, monkeypatch):
    """hashlib.file_digest is Python ≥ 3.11; the digest must not need it (reference: hashlib.sha256 of the bytes)."""
    data = bytes(range(256)) * (5 * 4096 + 7)  # > 1 MiB and not a multiple of the chunk size
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    want = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == want
    assert records._file_sha256(path) == want
