"""The node-local shard cache (shards.cache) against a real S3 wire-protocol server on 127.0.0.1.

GETs are counted by the server itself (a WSGI wrapper around moto's app), so "fetched once" is
seen from the bucket's side, not from the cache's own report. File contents are checked against
the sha256 that pack wrote into the manifest, with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import phantom_shards
from s3_server import CountingS3

from cxrbase.errors import CxrError

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("moto.server", reason="moto[server] is a dev dependency (pip install -e .[dev])")
pytest.importorskip("s3fs", reason="s3fs is the s3 extra (pip install -e .[s3])")


def _clear_fs_cache():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
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
def local_shards(tmp_path_factory) -> Path:
    """120 phantoms at 64 px in ~20 kB shards (several per split), through the shards CLI."""
    return phantom_shards(
        tmp_path_factory.mktemp("cache_shards"), 120, 64, 3, scheme="stratified", fractions="0.6,0.2,0.2",
        pack_args=["--shard-size-mb", "0.05"], subprocess_cli=True,
    ).shards  # fmt: skip


_BUCKETS = iter(range(10**6))


@pytest.fixture
def bucket_url(s3, local_shards) -> str:
    """A fresh bucket holding a copy of the local shards folder (uploaded with s3fs)."""
    import boto3

    name = f"cache-{next(_BUCKETS)}"
    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=name)
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    for path in sorted(local_shards.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), name, f"nih/{path.name}")
    return f"s3://{name}/nih"


def _manifest(local_shards: Path) -> dict:
    return json.loads((local_shards / "manifest.json").read_text())


def _split_entries(local_shards: Path, split: str) -> list[dict]:
    return [e for e in _manifest(local_shards)["shards"] if e["split"] == split]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tar_bytes_on_disk(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*.tar"))


def test_shards_spread_over_several_files(local_shards):
    assert len(_split_entries(local_shards, "train")) >= 3  # the eviction tests need several shards


# ------------------------------------------------------------------ one fetch per node
_RANK = textwrap.dedent(
    """
    import json, sys
    from shards.cache import ShardCache
    print("ready", flush=True)
    done = ShardCache(sys.argv[1]).ensure(sys.argv[2], ["train"])
    print(json.dumps({"fetched": done.fetched, "reused": done.reused, "folder": str(done.folder)}), flush=True)
    """
)


def test_two_ranks_on_one_node_fetch_each_shard_once(s3, bucket_url, local_shards, tmp_path):
    import fcntl

    cache = tmp_path / "node-cache"
    cache.mkdir()
    before = s3.tar_gets()
    # hold the node's lock while both "ranks" start, so that they queue on it together
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOCAL_RANK": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(cache), bucket_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "LOCAL_RANK": str(r)},
        )
        for r in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
    finally:
        os.close(fd)  # releases the lock: both ranks now contend for it
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))

    train = sorted(e["name"] for e in _split_entries(local_shards, "train"))
    after = s3.tar_gets()
    assert {n: after.get(n, 0) - before.get(n, 0) for n in train} == {n: 1 for n in train}
    assert not any(e["name"] in after and after[e["name"]] != before.get(e["name"], 0)
                   for e in _manifest(local_shards)["shards"] if e["split"] != "train")  # fmt: skip
    first, second = sorted(reports, key=lambda r: -len(r["fetched"]))
    assert (sorted(first["fetched"]), first["reused"]) == (train, [])  # the first lock holder fetched
    assert (second["fetched"], sorted(second["reused"])) == ([], train)  # the other waited, then reused
    folder = Path(reports[0]["folder"])
    for entry in _split_entries(local_shards, "train"):
        assert _sha(folder / entry["name"]) == entry["sha256"]
        assert (folder / entry["index"]).read_bytes() == (local_shards / entry["index"]).read_bytes()
    assert not list(cache.rglob("*.tmp"))


# ------------------------------------------------------------------ reuse, damage, bound
def test_reuse_across_jobs_without_a_get(s3, bucket_url, local_shards, tmp_path):
    from shards.cache import ShardCache

    cache = tmp_path / "c"
    first = ShardCache(cache).ensure(bucket_url, ["val"])
    before = s3.tar_gets()
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("cxr.data.cache")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        second = ShardCache(cache).ensure(bucket_url, ["val"])  # a new job: a new object, index read from disk
    finally:
        logger.removeHandler(handler)
    assert s3.tar_gets() == before
    names = sorted(e["name"] for e in _split_entries(local_shards, "val"))
    assert sorted(first.fetched) == names and second.fetched == [] and sorted(second.reused) == names
    line = [r.getMessage() for r in records if r.getMessage().startswith("shard cache")][-1]
    assert "fetched 0 shard(s)" in line and f"reused {len(names)}" in line and "evicted 0" in line


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_cached_shard_is_fetched_again(s3, bucket_url, local_shards, tmp_path, damage):
    from shards.cache import ShardCache

    cache = tmp_path / "c"
    folder = ShardCache(cache).ensure(bucket_url, ["val"]).folder
    entry = _split_entries(local_shards, "val")[0]
    path = folder / entry["name"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-512]))
    else:
        path.unlink()
    before = s3.gets(f"/nih/{entry['name']}")
    done = ShardCache(cache).ensure(bucket_url, ["val"])
    assert s3.gets(f"/nih/{entry['name']}") == before + 1
    assert done.fetched == [entry["name"]]
    assert _sha(path) == entry["sha256"]


def test_eviction_keeps_the_bound_and_drops_the_least_recently_used(s3, bucket_url, local_shards, tmp_path):
    from shards.cache import ShardCache

    size = {s: sum(e["bytes"] for e in _split_entries(local_shards, s)) for s in ("train", "val", "test")}
    bound = size["train"] + max(size["val"], size["test"]) + 1000  # train + one small split fit, not all three
    cache = tmp_path / "c"
    c = ShardCache(cache, max_gb=bound / 1e9)
    c.ensure(bucket_url, ["train"])
    c.ensure(bucket_url, ["val"])
    assert _tar_bytes_on_disk(cache) == size["train"] + size["val"]
    c.ensure(bucket_url, ["train"])  # train is now the most recently used
    before = s3.tar_gets()
    done = c.ensure(bucket_url, ["test"])  # val (least recent) must go, train stays
    assert _tar_bytes_on_disk(cache) <= bound
    val_names = {e["name"] for e in _split_entries(local_shards, "val")}
    assert {k.rsplit("/", 1)[-1] for k in done.evicted} == val_names
    assert not any((done.folder / n).exists() for n in val_names)
    again = c.ensure(bucket_url, ["train"])
    assert again.fetched == [] and s3.tar_gets() == {
        **before,
        **{e["name"]: before.get(e["name"], 0) + 1 for e in _split_entries(local_shards, "test")},
    }


def test_a_lost_index_still_counts_cached_files_against_the_bound(s3, bucket_url, local_shards, tmp_path):
    from shards.cache import ShardCache

    cache = tmp_path / "c"
    ShardCache(cache).ensure(bucket_url, ["train"])
    (cache / "index.json").unlink()
    val = sum(e["bytes"] for e in _split_entries(local_shards, "val"))
    ShardCache(cache, max_gb=(val + 1000) / 1e9).ensure(bucket_url, ["val"])
    assert _tar_bytes_on_disk(cache) == val


def test_a_split_larger_than_the_bound_is_a_clear_error(s3, bucket_url, tmp_path):
    from shards.cache import ShardCache

    with pytest.raises(CxrError, match=r"data\.cache_max_gb=.*raise data\.cache_max_gb"):
        ShardCache(tmp_path / "c", max_gb=1e-6).ensure(bucket_url, ["train"])


# ------------------------------------------------------------------ what the bucket holds is wrong
def test_an_object_that_differs_from_the_manifest_fails_naming_url_and_fix(s3, bucket_url, local_shards, tmp_path):
    import boto3

    from shards.cache import ShardCache

    entry = _split_entries(local_shards, "val")[0]
    data = bytearray((local_shards / entry["name"]).read_bytes())
    data[100] ^= 1  # same size, other sha256
    bucket, prefix = bucket_url[5:].split("/", 1)
    boto3.client("s3", endpoint_url=s3.endpoint).put_object(
        Bucket=bucket, Key=f"{prefix}/{entry['name']}", Body=bytes(data)
    )
    cache = tmp_path / "c"
    with pytest.raises(CxrError) as err:
        ShardCache(cache).ensure(bucket_url, ["val"])
    text = str(err.value)
    assert text.startswith(f"{bucket_url}/{entry['name']}: ") and entry["sha256"] in text
    assert "cxr-shards pack --out" in text and "\n" not in text
    assert not list(cache.rglob(entry["name"])) and not list(cache.rglob("*.tmp"))  # nothing unverified kept


def test_a_url_without_manifest_names_it(s3, tmp_path):
    import boto3

    from shards.cache import ShardCache

    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket="empty-one")
    with pytest.raises(CxrError, match=r"^s3://empty-one/nothing/manifest.json: .*no shards manifest.*pack --out"):
        ShardCache(tmp_path / "c").ensure("s3://empty-one/nothing", ["train"])
    with pytest.raises(CxrError, match=r"^s3://no-such-bucket/x/manifest.json: bucket 'no-such-bucket' does not exist"):
        ShardCache(tmp_path / "c").ensure("s3://no-such-bucket/x", ["train"])


def test_a_shard_missing_from_the_bucket_names_it(s3, bucket_url, local_shards, tmp_path):
    import boto3

    from shards.cache import ShardCache

    entry = _split_entries(local_shards, "test")[0]
    bucket, prefix = bucket_url[5:].split("/", 1)
    boto3.client("s3", endpoint_url=s3.endpoint).delete_object(Bucket=bucket, Key=f"{prefix}/{entry['name']}")
    with pytest.raises(CxrError, match=rf"^{bucket_url}/{entry['name']}: .*missing.*pack --out {bucket_url} "):
        ShardCache(tmp_path / "c").ensure(bucket_url, ["test"])
    assert not list((tmp_path / "c").rglob("*.tmp"))


def test_cache_settings_are_validated():
    from cxr.data import DataConfig

    for bad in (0, -1, "lots", True):
        with pytest.raises(CxrError, match="data.cache_max_gb"):
            DataConfig(cache_max_gb=bad)
    with pytest.raises(CxrError, match="data.cache_dir"):
        DataConfig(cache_dir="  ")


def test_the_g5_profile_puts_the_cache_on_the_instance_nvme():
    from launch.profiles import load_profiles

    assert load_profiles()["g5.24xlarge"].env["CXR_CACHE_DIR"] == "/scratch/cxr-cache"


def test_default_cache_dir_is_node_local(monkeypatch):
    from shards.cache import default_cache_dir

    monkeypatch.setenv("CXR_CACHE_DIR", "/nvme/c")
    assert default_cache_dir() == Path("/nvme/c")
    monkeypatch.delenv("CXR_CACHE_DIR")
    monkeypatch.setenv("SLURM_TMPDIR", "/scratch/job42")
    assert default_cache_dir() == Path("/scratch/job42/cxr-cache")
    monkeypatch.delenv("SLURM_TMPDIR")
    monkeypatch.setenv("USER", "ann")
    assert default_cache_dir() == Path("/tmp/cxr-cache-ann")


# ------------------------------------------------------------------ DALI through the cache
@pytest.mark.parametrize("split,train", [("val", False), ("train", True)])
def test_dali_through_the_cache_gives_the_samples_of_local_files(s3, bucket_url, local_shards, tmp_path, split, train):
    pytest.importorskip("nvidia.dali")
    from cxr.data import DataConfig, build_loader, to_device

    common = dict(backend="dali", device="cpu", resolution=64, batch_size=8, num_threads=1, seed=5, pin_memory=False)
    local = build_loader(DataConfig(shards=str(local_shards), **common), split, epoch=1, train=train)
    remote = build_loader(
        DataConfig(shards=bucket_url, cache_dir=str(tmp_path / "c"), **common), split, epoch=1, train=train
    )
    assert remote.fetch_seconds > 0 and local.fetch_seconds == 0
    got = [(b["key"], to_device(b, "cpu").numpy(), b["labels"].numpy()) for b in remote]
    want = [(b["key"], to_device(b, "cpu").numpy(), b["labels"].numpy()) for b in local]
    assert len(got) == len(want) > 0
    for (gk, gi, gl), (wk, wi, wl) in zip(got, want, strict=True):
        assert gk == wk
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gl, wl)


# ------------------------------------------------------------------ the user's command
def _train(bucket_url: str, cache: Path, run_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cxr.train", "--config", "cxr/configs/tiny.yaml", f"data.shards={bucket_url}",
           f"data.cache_dir={cache}", f"checkpoint.run_dir={run_dir}", "data.resolution=64", "data.device=cpu",
           "train.epochs=1", "logging.progress=false"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_training_from_a_bucket_caches_once_and_logs_fetch_time_apart(s3, bucket_url, local_shards, tmp_path):
    pytest.importorskip("nvidia.dali")
    import pandas as pd

    cache = tmp_path / "nvme"
    for job in ("job1", "job2"):  # two jobs on one node: the second fetches nothing
        before = s3.tar_gets()
        done = _train(bucket_url, cache, tmp_path / job)
        assert done.returncode == 0, done.stderr[-3000:]
        log = (tmp_path / job / "train.log").read_text()
        got = {n: k - before.get(n, 0) for n, k in s3.tar_gets().items() if k != before.get(n, 0)}
        train = {e["name"] for e in _split_entries(local_shards, "train")}
        val = {e["name"] for e in _split_entries(local_shards, "val")}
        if job == "job1":
            assert got == {n: 1 for n in train | val}  # each train and val shard fetched once, test never
            assert f"fetched {len(train)} shard(s)" in log and f"fetched {len(val)} shard(s)" in log
        else:
            assert got == {}
            assert "fetched 0 shard(s)" in log and f"reused {len(train)}" in log
        row = pd.read_csv(tmp_path / job / "throughput.csv").iloc[-1]
        assert row["fetch_seconds"] > 0 and row["data_wait_seconds"] > 0 and row["step_seconds"] > 0
        assert row["fetch_seconds"] + row["data_wait_seconds"] + row["step_seconds"] <= row["train_seconds"] + 1e-3
        assert "(fetch " in log and "data wait " in log


def test_throughput_csv_of_an_older_run_gains_the_timing_columns(tmp_path):
    import csv

    import torch

    from cxr.runs import run_log

    old = "epoch,images,train_seconds,epoch_seconds,train_images_per_s,peak_memory_mb\n1,64,2.0,3.0,32.0,100.0\n"
    (tmp_path / "throughput.csv").write_text(old)
    run_log.record_throughput(tmp_path, 2, 64, 4.0, 5.0, torch.device("cpu"), fetch_s=1.5, data_wait_s=0.5)
    rows = list(csv.DictReader((tmp_path / "throughput.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert (rows[0]["fetch_seconds"], rows[0]["step_seconds"]) == ("", "")  # unknown for the old epoch, not 0
    assert (float(rows[1]["fetch_seconds"]), float(rows[1]["data_wait_seconds"])) == (1.5, 0.5)
    assert float(rows[1]["step_seconds"]) == 4.0 - 1.5 - 0.5
