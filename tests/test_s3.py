"""Shards in object storage: pack into, verify in, evaluate and train from `s3://` (a real S3 wire-protocol
server on 127.0.0.1, tests/s3_server.py) and `http://` (the standard library's http.server).

References are independent of the URL code: the same commands on a local folder (shards packed by the
unchanged local path, a training run reading local files), the objects as boto3 lists and reads them,
and the fake secret of the test server grepped for in everything written.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    ROOT,
    evaluate_to,
    finish,
    launch,
    launch_env,
    make_member,
    one_line_error,
    output,
    rank_pids,
    same_report,
    url_pack_args,
    wait_for_line,
    weights,
)
from s3_server import FAKE_SECRET

from cxrbase.errors import CxrError
from shards.cli import main as shards_main

pytestmark = pytest.mark.integration


def _objects(server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    return {k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="module")
def bucket_shards(s3_server, train_shards) -> str:
    """train_shards' images packed straight into s3://train/shards with the same settings."""
    url = s3_server.make_bucket("train") + "/shards"
    assert shards_main(url_pack_args(train_shards, url)) == 0
    return url


# ------------------------------------------------------------------------------ pack / verify
def test_pack_into_a_bucket_writes_the_same_shards_as_a_local_pack_and_verifies(
    s3_server, bucket_shards, train_shards, capsys
):
    objects = _objects(s3_server, "train", "shards")
    local = json.loads((train_shards / "manifest.json").read_text())
    remote = json.loads(objects["manifest.json"])
    assert [(s["name"], s["sha256"], s["bytes"]) for s in remote["shards"]] == [
        (s["name"], s["sha256"], s["bytes"]) for s in local["shards"]
    ]
    for entry in local["shards"]:  # every shard and index is an object, byte for byte the local file
        assert objects[entry["name"]] == (train_shards / entry["name"]).read_bytes()
        assert objects[entry["index"]] == (train_shards / entry["index"]).read_bytes()
    # the resume journal lives beside the shards: its settings and one object per shard
    assert {k for k in objects if k.startswith(".pack-journal/")} == {".pack-journal/settings.json"} | {
        f".pack-journal/{i:08d}.json" for i in range(len(local["shards"]))
    }
    assert not [k for k, data in objects.items() if FAKE_SECRET.encode() in data]  # no credential in any object
    capsys.readouterr()
    assert shards_main(["verify", bucket_shards, "--workers", "1"]) == 0
    assert f"OK — {bucket_shards}" in capsys.readouterr().out


def test_a_flipped_byte_in_an_object_fails_verify_naming_the_shard_and_sample(s3_server, bucket_shards, capsys):
    import s3fs

    s3fs.S3FileSystem().copy("train/shards", "train/flipped", recursive=True)
    url = bucket_shards.replace("/shards", "/flipped")
    client = s3_server.client()
    index = client.get_object(Bucket="train", Key="flipped/train-000000.idx")["Body"].read().decode()
    fields = index.splitlines()[3].split()  # the third sample: ext offset size name ...
    members = {fields[j]: (int(fields[j + 1]), int(fields[j + 2])) for j in range(0, len(fields), 4)}
    offset, size = members["png"]
    body = bytearray(client.get_object(Bucket="train", Key="flipped/train-000000.tar")["Body"].read())
    body[offset + size // 2] ^= 0x01
    client.put_object(Bucket="train", Key="flipped/train-000000.tar", Body=bytes(body))
    capsys.readouterr()
    assert shards_main(["verify", url, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    key = fields[3].partition(".")[0]
    assert "FAIL train-000000.tar: size/sha256 differ from the manifest" in out, out
    assert re.search(rf"FAIL train-000000.tar: {key}: .*crc32", out), out
    assert "FAILED" in out


def test_a_pack_killed_after_an_upload_resumes_to_the_same_objects(s3_server, bucket_shards, train_shards, capsys):
    """The kill comes right after the 3rd object upload (a shard up, its index and journal entry not yet):
    the re-run keeps what the journal vouches for (sizes listed, sha256 streamed) and ends with the
    objects of an uninterrupted pack."""
    url = bucket_shards.replace("/shards", "/killed")
    args = url_pack_args(train_shards, url)
    hook = (
        "import os, signal, sys\n"
        "import shards.remote as remote\n"
        "put, count = remote.put_file, [0]\n"
        "def killing_put(local, loc):\n"
        "    put(local, loc)\n"
        "    count[0] += 1\n"
        "    if count[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "remote.put_file = killing_put\n"
        "from shards.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hook, *args], cwd=ROOT, env=launch_env(), capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    partial = _objects(s3_server, "train", "killed")
    assert "manifest.json" not in partial and sum(k.endswith(".tar") for k in partial) == 2, sorted(partial)
    journal = sorted(k for k in partial if k.startswith(".pack-journal/"))
    # settings + the one shard whose index was up before the kill
    assert journal == [".pack-journal/00000000.json", ".pack-journal/settings.json"], journal
    capsys.readouterr()
    assert shards_main(args) == 0
    summary = capsys.readouterr().out
    done = json.loads(partial[".pack-journal/00000000.json"])["samples"]
    assert f"{done} already packed" in summary, summary
    assert _objects(s3_server, "train", "killed").keys() == _objects(s3_server, "train", "shards").keys()
    whole = json.loads(_objects(s3_server, "train", "shards")["manifest.json"])["shards"]
    resumed = json.loads(_objects(s3_server, "train", "killed")["manifest.json"])["shards"]
    assert resumed == whole


# ------------------------------------------------------------------------------ errors
def test_missing_bucket_object_and_rejected_credentials_are_one_line_errors(s3_server, bucket_shards, capsys):
    err = one_line_error(capsys, ["verify", "s3://no-such-bucket/shards"])
    assert re.match(r"error: s3://no-such-bucket/shards\S*: bucket 'no-such-bucket' does not exist — ", err), err
    assert "aws s3 mb s3://no-such-bucket" in err
    err = one_line_error(capsys, ["verify", bucket_shards.replace("/shards", "/nothing")])
    assert "s3://train/nothing/manifest.json: no shards manifest here — run `python -m shards pack" in err
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():  # the server now checks keys: the test's fake one is unknown to it
        err = one_line_error(capsys, ["verify", bucket_shards])
    assert re.match(rf"error: {bucket_shards}\S*: access denied \(the credentials were rejected", err), err
    assert "AWS_PROFILE" in err


def test_a_shard_missing_from_the_bucket_is_named(s3_server, bucket_shards):
    import s3fs

    from cxr.data import DataConfig, build_loader

    s3fs.S3FileSystem().copy("train/shards", "train/holed", recursive=True)
    s3_server.client().delete_object(Bucket="train", Key="holed/val-000000.tar")
    url = bucket_shards.replace("/shards", "/holed")
    cfg = DataConfig(shards=url, backend="wds", resolution=64, num_threads=0)
    with pytest.raises(CxrError, match=rf"{url}/val-000000.tar: shard listed in the manifest is missing"):
        build_loader(cfg, "val")


# ------------------------------------------------------------------------------ reading: loaders, evaluate
@pytest.mark.parametrize("source", ["bucket_shards", "http_shards"])
def test_the_wds_loader_yields_the_same_batches_from_a_url_as_from_the_folder(request, source, train_shards):
    """Training's reader (per-rank order, skip_batches, augmentation) streams from s3:// and plain http://."""
    import torch

    from cxr.data import DataConfig, build_loader, to_device

    url = request.getfixturevalue(source)
    assert url.startswith(("s3://", "http://"))

    def batches(shards):
        cfg = DataConfig(shards=str(shards), backend="wds", resolution=64, batch_size=16, num_threads=2, seed=3)
        return list(build_loader(cfg, "train", rank=1, world_size=2, epoch=1, skip_batches=2))

    local, remote = batches(train_shards), batches(url)
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote):
        assert a["key"] == b["key"]
        assert torch.equal(to_device(a, "cpu"), to_device(b, "cpu")) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["meta"], b["meta"])


def test_cxr_data_inspect_reads_the_bucket_as_the_folder(bucket_shards, train_shards, capsys):
    from cxr.data.__main__ import main as data_main

    def inspect(shards) -> dict:
        capsys.readouterr()
        argv = ["inspect", "--shards", str(shards), "--split", "val", "--backend", "wds", "--resolution", "64"]
        assert data_main([*argv, "--num-threads", "0", "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    local, remote = inspect(train_shards), inspect(bucket_shards)
    assert remote["samples"] == local["samples"] > 0
    assert remote["keys_sha256"] == local["keys_sha256"]


@pytest.fixture(scope="module")
def member(train_shards, tmp_path_factory) -> Path:
    return make_member(tmp_path_factory.mktemp("s3-member") / "m1", train_shards, seed=1)


def test_evaluate_from_the_bucket_equals_evaluate_from_the_folder(member, bucket_shards, train_shards, tmp_path):
    evaluate_to(member, str(train_shards), tmp_path / "local")
    evaluate_to(member, bucket_shards, tmp_path / "bucket")
    same_report(tmp_path / "local", tmp_path / "bucket")
    assert bucket_shards in (tmp_path / "bucket" / "report.md").read_text()
    assert not any(
        FAKE_SECRET in p.read_text(errors="replace") for p in (tmp_path / "bucket").rglob("*") if p.is_file()
    )


def test_explain_from_the_bucket_draws_the_same_overlays_as_from_the_folder(
    member, bucket_shards, train_shards, tmp_path
):
    from cxr.tools.explain import main as explain_main

    keys = [
        line.split()[3].partition(".")[0] for line in (train_shards / "test-000000.idx").read_text().splitlines()[1:3]
    ]

    def overlays(shards: str, out: Path) -> dict[str, bytes]:
        argv = ["--run", str(member), "--shards", shards, "--split", "test", "--keys", ",".join(keys)]
        assert explain_main([*argv, "--labels", "Effusion", "--method", "gradcam", "--out", str(out), "--debug"]) == 0
        return {p.name: p.read_bytes() for p in sorted(out.rglob("*.png"))}

    local, remote = overlays(str(train_shards), tmp_path / "local"), overlays(bucket_shards, tmp_path / "bucket")
    assert len(local) == 2 and local == remote


# ------------------------------------------------------------------------------ plain HTTP (read-only)
@pytest.fixture(scope="module")
def http_shards(train_shards) -> str:
    """train_shards served by http.server on 127.0.0.1 (directory listings, ranged GETs unsupported)."""
    handler = functools.partial(_QuietHandler, directory=str(train_shards.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{train_shards.name}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_verify_and_evaluate_over_plain_http(http_shards, member, train_shards, tmp_path, capsys):
    capsys.readouterr()
    assert shards_main(["verify", http_shards, "--workers", "1"]) == 0
    assert f"OK — {http_shards}" in capsys.readouterr().out
    evaluate_to(member, str(train_shards), tmp_path / "local")
    evaluate_to(member, http_shards, tmp_path / "http")
    same_report(tmp_path / "local", tmp_path / "http")


# ------------------------------------------------------------------------------ training (2 gloo ranks)
WDS = ("data.backend=wds", "data.num_threads=1")


@pytest.mark.parametrize("workers", [0, 1])
def test_the_wds_loader_leaves_the_global_rng_alone(train_shards, workers):
    """The DataLoader iterator starts at the first batch, outside open_loader's fork_rng: a draw from
    torch's global stream there (its workers' base seed) shifted a resumed run's dropout masks."""
    import torch

    from cxr.data import DataConfig, build_loader

    cfg = DataConfig(shards=str(train_shards), backend="wds", resolution=64, batch_size=16, num_threads=workers)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = iter(build_loader(cfg, "train", epoch=1))
    next(batches)
    assert torch.equal(torch.get_rng_state(), before)
    batches.close()


@pytest.mark.slow
def test_two_ranks_train_from_the_bucket_and_resume_after_sigusr1_bitwise_equal_to_a_local_run(
    bucket_shards, train_shards, tmp_path
):
    run_local = tmp_path / "local"
    assert finish(launch(train_shards, run_local, *WDS)) == 0, output(run_local)[-3000:]
    run_s3 = tmp_path / "s3"
    proc = launch(bucket_shards, run_s3, *WDS)
    pids = rank_pids(run_s3, proc)
    wait_for_line(run_s3, r"step 16 epoch 2 ", proc)  # 3 steps into epoch 2
    os.kill(pids[1], __import__("signal").SIGUSR1)
    assert finish(proc) != 0
    meta = json.loads((run_s3 / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["epoch"] == 1 and meta["step_in_epoch"] >= 3, meta
    assert finish(launch(bucket_shards, run_s3, *WDS)) == 0, output(run_s3)[-3000:]
    assert f"resumed from {run_s3}/checkpoints/last at epoch 2" in (run_s3 / "train.log").read_text()
    for name in ("last", "best"):
        a, b = weights(run_local, name), weights(run_s3, name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    pd.testing.assert_frame_equal(
        pd.read_parquet(run_local / "val_predictions.parquet"), pd.read_parquet(run_s3 / "val_predictions.parquet")
    )
    assert bucket_shards in (run_s3 / "config.yaml").read_text()
    # credentials come from the environment only and are written nowhere
    written = [p for p in run_s3.rglob("*") if p.is_file()] + [run_s3.parent / "s3.out"]
    assert not [p for p in written if FAKE_SECRET.encode() in p.read_bytes()]
