"""A warm node cache (shards.cache) costs a run's later epochs no request and no hashing.

Requests are counted by the S3 server itself (tests/s3_server.py's CountingS3, a WSGI
wrapper around moto's app); hashing is counted at shards.cache.file_sha256, the cache's only hasher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ROOT, phantom_shards
from s3_server import CountingS3

pytestmark = pytest.mark.integration


def _clear_fs_cache():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3():
    from s3_server import aws_env

    server = CountingS3()
    try:
        with aws_env(server.endpoint) as env:
            _clear_fs_cache()
            server.env = env
            try:
                yield server
            finally:
                _clear_fs_cache()
    finally:
        server.server.shutdown()


@pytest.fixture(scope="module")
def bucket_url(s3, tmp_path_factory) -> str:
    """120 phantoms at 64 px in several small shards per split, with derived res32/, uploaded."""
    import boto3

    shards = phantom_shards(
        tmp_path_factory.mktemp("warm_shards"), 120, 64, 3, scheme="stratified", fractions="0.6,0.2,0.2",
        pack_args=["--shard-size-mb", "0.05", "--resize", "32"], subprocess_cli=True,
    ).shards  # fmt: skip
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    client.create_bucket(Bucket="warm")
    for path in sorted(shards.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), "warm", f"nih/{path.relative_to(shards).as_posix()}")
    return "s3://warm/nih"


@pytest.fixture
def hashes(monkeypatch) -> list[Path]:
    import shards.cache

    seen: list[Path] = []
    real = shards.cache.file_sha256

    def counting(path, *args, **kwargs):
        seen.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shards.cache, "file_sha256", counting)
    return seen


@pytest.mark.parametrize("resolution", [None, 32])
def test_later_epochs_of_a_run_make_no_request_and_hash_nothing(s3, bucket_url, tmp_path, hashes, resolution):
    from shards.cache import ShardCache

    cache = tmp_path / "c"
    first = ShardCache(cache).ensure(bucket_url, ["train"], resolution)  # epoch 0: fetches and hashes
    assert first.fetched and len(hashes) == len(first.fetched)
    sub = "res32/" if resolution else ""
    manifest = json.loads((first.folder / sub / "manifest.json").read_text())
    assert sorted(first.fetched) == sorted(e["name"] for e in manifest["shards"] if e["split"] == "train")
    before, hashed, start = sum(s3.requests.values()), len(hashes), time.time()
    for _ in range(3):  # epochs 1..3: a new loader (and ShardCache) each, in the same process
        again = ShardCache(cache).ensure(bucket_url, ["train"], resolution)
        assert again.fetched == [] and sorted(again.reused) == sorted(first.fetched)
    assert sum(s3.requests.values()) == before  # not even the manifest
    assert len(hashes) == hashed
    # the use is still recorded for LRU eviction
    index = json.loads((cache / "index.json").read_text())["entries"]
    assert sorted(index) == sorted(f"{first.folder.name}/{sub}{name}" for name in first.fetched)
    assert all(rec["used"] >= start for rec in index.values())


def test_a_changed_mirror_manifest_is_read_again_from_the_bucket(s3, bucket_url, tmp_path, hashes):
    """Another job on the node mirrored the URL again (its copy of manifest.json was rewritten):
    this process no longer trusts what it read, GETs the manifest, and still hashes nothing."""
    from shards.cache import ShardCache

    cache = tmp_path / "c"
    done = ShardCache(cache).ensure(bucket_url, ["val"])
    hashed, gets = len(hashes), s3.gets("/nih/manifest.json")
    mirrored = done.folder / "manifest.json"
    text = mirrored.read_text()
    mirrored.unlink()
    mirrored.write_text(text)  # a new file: another inode, another mtime
    again = ShardCache(cache).ensure(bucket_url, ["val"])
    assert s3.gets("/nih/manifest.json") == gets + 1
    assert again.fetched == [] and len(hashes) == hashed


def test_a_new_job_reads_the_manifest_again_and_an_empty_index_is_rebuilt(s3, bucket_url, tmp_path):
    """A new process (a requeue, the next job) GETs the manifest (how a re-pack is noticed), fetches
    no shard; an index.json left empty (it is not fsync'd) is rebuilt by hashing, not by fetching."""
    from shards.cache import ShardCache

    cache = tmp_path / "c"
    ShardCache(cache).ensure(bucket_url, ["val"])
    (cache / "index.json").write_text("")
    tars, gets = s3.tar_gets(), s3.gets("/nih/manifest.json")
    code = textwrap.dedent(
        """
        import json, sys
        import shards.cache
        from shards.cache import ShardCache
        hashed = []
        real = shards.cache.file_sha256
        shards.cache.file_sha256 = lambda path, *a: hashed.append(str(path)) or real(path, *a)
        done = ShardCache(sys.argv[1]).ensure(sys.argv[2], ["val"])
        print(json.dumps({"fetched": done.fetched, "reused": sorted(done.reused), "hashed": len(hashed)}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(cache), bucket_url],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fetched"] == [] and out["reused"] and out["hashed"] == len(out["reused"])
    assert s3.gets("/nih/manifest.json") == gets + 1
    assert s3.tar_gets() == tars
