"""`cxr-shards pack --resize N --out s3://…`: derived shards `resN/` written into a bucket (a real S3
wire-protocol server on 127.0.0.1, tests/s3_server.py) with the guarantees of the masters.

References are independent of the URL code: the same `pack --resize` into a local folder (the unchanged
local path), the objects as boto3 lists and reads them, and a flipped byte put with boto3.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, launch_env

from shards.cli import main as shards_main

pytestmark = pytest.mark.integration
RES = 32
PACK = ["--shard-size-mb", "0.5", "--workers", "1", "--resize", str(RES)]


def _pack_args(train_shards: Path, out: str) -> list[str]:
    base = train_shards.parent
    images = str(base / "synth" / "images")
    return ["pack", "--splits", str(base / "splits.parquet"), "--images", images, "--out", out, *PACK]


def _objects(server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="module")
def local_resized(train_shards, tmp_path_factory) -> Path:
    """The reference: the same images and splits packed with --resize into a local folder."""
    out = tmp_path_factory.mktemp("resize_local") / "shards"
    assert shards_main(_pack_args(train_shards, str(out))) == 0
    return out


@pytest.fixture(scope="module")
def bucket_resized(s3_server, train_shards) -> str:
    url = s3_server.make_bucket("resize") + "/shards"
    assert shards_main(_pack_args(train_shards, url)) == 0
    return url


def test_pack_resize_into_a_bucket_writes_the_local_res_shards_byte_for_byte_and_verifies(
    s3_server, bucket_resized, local_resized, capsys
):
    objects = _objects(s3_server, "resize", "shards")
    local = json.loads((local_resized / f"res{RES}" / "manifest.json").read_text())
    assert len(local["shards"]) >= 3  # several derived shards, so the kill test below stops between two
    remote = json.loads(objects[f"res{RES}/manifest.json"])
    assert remote["derived"] is True and remote["resolution"] == RES
    assert remote["shards"] == local["shards"]
    assert remote["image_sizes"] == local["image_sizes"] == {f"{RES}x{RES}": sum(s["samples"] for s in local["shards"])}
    derived = {k for k in objects if k.startswith(f"res{RES}/") and not k.startswith(f"res{RES}/.pack-journal/")}
    on_disk = {f"res{RES}/{p.name}" for p in (local_resized / f"res{RES}").iterdir() if not p.name.startswith(".")}
    assert derived == on_disk  # the same files: every shard, every index, the manifest
    for entry in local["shards"]:  # each derived shard and index: one object, byte for byte the local file
        for name in (entry["name"], entry["index"]):
            assert objects[f"res{RES}/{name}"] == (local_resized / f"res{RES}" / name).read_bytes(), name
    # the derived journal lives beside them, one object per shard, as the masters'
    assert {k for k in objects if k.startswith(f"res{RES}/.pack-journal/")} == {
        f"res{RES}/.pack-journal/settings.json"
    } | {f"res{RES}/.pack-journal/{i:08d}.json" for i in range(len(local["shards"]))}
    capsys.readouterr()
    assert shards_main(["verify", f"{bucket_resized}/res{RES}", "--workers", "1"]) == 0
    assert f"OK — {bucket_resized}/res{RES}" in capsys.readouterr().out


def test_a_flipped_byte_in_a_derived_object_fails_verify(s3_server, bucket_resized, capsys):
    import s3fs

    s3fs.S3FileSystem().copy(f"resize/shards/res{RES}", "resize/flipped", recursive=True)
    client = s3_server.client()
    manifest = json.loads(client.get_object(Bucket="resize", Key="flipped/manifest.json")["Body"].read())
    shard = manifest["shards"][0]
    index = client.get_object(Bucket="resize", Key=f"flipped/{shard['index']}")["Body"].read().decode()
    fields = index.splitlines()[2].split()  # the second sample: ext offset size name ...
    members = {fields[j]: (int(fields[j + 1]), int(fields[j + 2])) for j in range(0, len(fields), 4)}
    offset, size = members["png"]
    body = bytearray(client.get_object(Bucket="resize", Key=f"flipped/{shard['name']}")["Body"].read())
    body[offset + size // 2] ^= 0x01
    client.put_object(Bucket="resize", Key=f"flipped/{shard['name']}", Body=bytes(body))
    capsys.readouterr()
    assert shards_main(["verify", "s3://resize/flipped", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    key = fields[3].partition(".")[0]
    assert f"FAIL {shard['name']}: size/sha256 differ from the manifest" in out, out
    assert re.search(rf"FAIL {re.escape(shard['name'])}: {key}: .*crc32", out), out


def test_a_resize_killed_after_a_derived_upload_resumes_to_the_same_objects(
    s3_server, bucket_resized, train_shards, capsys
):
    """The kill comes when the 2nd derived shard is up (its tar and index objects) but not yet journaled:
    the re-run re-packs no master, keeps the one journaled derived shard (its sha256 streamed) and ends
    with the objects of an uninterrupted pack."""
    url = bucket_resized.replace("/shards", "/killed")
    args = _pack_args(train_shards, url)
    hook = (
        "import os, signal, sys\n"
        "from shards import pack_journal\n"
        "add, count = pack_journal.Journal.add, [0]\n"
        "def killing_add(self, entry):\n"
        f"    if self.url and str(self.parts).endswith('/res{RES}/.pack-journal'):\n"
        "        count[0] += 1\n"
        "        if count[0] == 2:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "    add(self, entry)\n"
        "pack_journal.Journal.add = killing_add\n"
        "from shards.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hook, *args], cwd=ROOT, env=launch_env(), capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    partial = _objects(s3_server, "resize", "killed")
    whole = _objects(s3_server, "resize", "shards")
    assert "manifest.json" in partial and f"res{RES}/manifest.json" not in partial, sorted(partial)
    journal = sorted(k for k in partial if k.startswith(f"res{RES}/.pack-journal/"))
    assert journal == [f"res{RES}/.pack-journal/00000000.json", f"res{RES}/.pack-journal/settings.json"], journal
    first = json.loads(partial[journal[0]])["name"]
    assert partial[f"res{RES}/{first}"] == whole[f"res{RES}/{first}"]
    capsys.readouterr()
    assert shards_main(args) == 0
    summary = capsys.readouterr().out
    assert "pack: 0 images in" in summary and "1 shards already derived" in summary, summary
    resumed = _objects(s3_server, "resize", "killed")
    assert resumed.keys() == whole.keys()
    for name, data in whole.items():
        if name.endswith((".tar", ".idx")):
            assert resumed[name] == data, name
    key = f"res{RES}/manifest.json"
    assert json.loads(resumed[key])["shards"] == json.loads(whole[key])["shards"]


def test_training_from_the_bucket_reads_the_derived_shards(bucket_resized, local_resized, tmp_path):
    """data.shards=URL data.resolution=N finds URL/resN/ as a folder's resN/ is found: the streaming
    loaders' manifest and, for DALI, the node cache's copy (byte for byte the local derived shards)."""
    from cxr.data.shard_index import image_source, load_shards_manifest
    from shards.cache import ShardCache

    folder, manifest = load_shards_manifest(bucket_resized, RES)
    assert str(folder) == f"{bucket_resized}/res{RES}" and manifest["resolution"] == RES
    assert image_source(bucket_resized, RES)["source"] == f"derived {bucket_resized}/res{RES}"
    local_folder, local_manifest = load_shards_manifest(local_resized, RES)
    assert local_folder == local_resized / f"res{RES}" and manifest["shards"] == local_manifest["shards"]
    fetched = ShardCache(tmp_path / "cache").ensure(bucket_resized, ["train"], RES)
    trains = [s for s in local_manifest["shards"] if s["split"] == "train"]
    assert sorted(fetched.fetched) == sorted(s["name"] for s in trains)
    cached, _ = load_shards_manifest(fetched.folder, RES)
    assert cached == fetched.folder / f"res{RES}"
    for entry in trains:
        assert (cached / entry["name"]).read_bytes() == (local_folder / entry["name"]).read_bytes()
