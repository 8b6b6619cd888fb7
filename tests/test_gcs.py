"""Shards in Google Cloud Storage: pack into, verify in, train and evaluate from `gs://` against a GCS
JSON-API server on 127.0.0.1 (gcp-storage-emulator, tests/gcs_server.py) — the gs:// twin of the cheapest
tests of tests/test_s3.py, through the same commands.

References are independent of the URL code: the same commands on the local folder (`train_shards`, packed
by the unchanged local path), and the objects as Google's own client (google-cloud-storage) lists and
reads them. The emulator takes anonymous requests, so there is no secret here to look for in what is
written; that remote.py passes none is shown for S3 in tests/test_s3.py.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from helpers import ROOT, evaluate_to, launch_env, make_member, one_line_error, same_report, url_pack_args, weights

from cxrbase.errors import CxrError
from shards.cli import main as shards_main

pytestmark = pytest.mark.integration
BUCKET = "cxr-gcs"


@pytest.fixture(scope="module")
def gcs_shards(gcs_server, train_shards) -> str:
    """train_shards' images packed straight into gs://cxr-gcs/shards with the same settings."""
    url = gcs_server.make_bucket(BUCKET) + "/shards"
    assert shards_main(url_pack_args(train_shards, url)) == 0
    return url


# ------------------------------------------------------------------------------ pack / verify
def test_pack_into_a_gcs_bucket_writes_the_same_shards_as_a_local_pack_and_verifies(
    gcs_server, gcs_shards, train_shards, capsys
):
    objects = gcs_server.objects(BUCKET, "shards")
    local = json.loads((train_shards / "manifest.json").read_text())
    remote = json.loads(objects["manifest.json"])
    assert [(s["name"], s["sha256"], s["bytes"]) for s in remote["shards"]] == [
        (s["name"], s["sha256"], s["bytes"]) for s in local["shards"]
    ]
    for entry in local["shards"]:  # every shard and index is an object, byte for byte the local file
        assert objects[entry["name"]] == (train_shards / entry["name"]).read_bytes()
        assert objects[entry["index"]] == (train_shards / entry["index"]).read_bytes()
    assert {k for k in objects if k.startswith(".pack-journal/")} == {".pack-journal/settings.json"} | {
        f".pack-journal/{i:08d}.json" for i in range(len(local["shards"]))
    }
    capsys.readouterr()
    assert shards_main(["verify", gcs_shards, "--workers", "1"]) == 0
    assert f"OK — {gcs_shards}" in capsys.readouterr().out


def test_a_flipped_byte_in_a_gcs_object_fails_verify_naming_the_shard_and_sample(gcs_server, gcs_shards, capsys):
    objects = gcs_server.objects(BUCKET, "shards")
    fields = objects["train-000000.idx"].decode().splitlines()[3].split()  # 3rd sample: ext offset size name ...
    members = {fields[j]: (int(fields[j + 1]), int(fields[j + 2])) for j in range(0, len(fields), 4)}
    offset, size = members["png"]
    body = bytearray(objects["train-000000.tar"])
    body[offset + size // 2] ^= 0x01
    objects["train-000000.tar"] = bytes(body)
    for key, data in objects.items():  # a copy of the prefix with the one byte flipped
        gcs_server.put(BUCKET, f"flipped/{key}", data)
    url = gcs_shards.replace("/shards", "/flipped")
    capsys.readouterr()
    assert shards_main(["verify", url, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    key = fields[3].partition(".")[0]
    assert "FAIL train-000000.tar: size/sha256 differ from the manifest" in out, out
    assert re.search(rf"FAIL train-000000.tar: {key}: .*crc32", out), out
    assert "FAILED" in out


def test_the_node_local_cache_mirrors_gs_and_refuses_a_damaged_object(gcs_server, gcs_shards, train_shards, tmp_path):
    """The DALI back end's cache (shards.cache) fetches from gs:// and checks each shard's sha256."""
    from shards.cache import ShardCache

    done = ShardCache(tmp_path / "cache").ensure(gcs_shards, splits=["val"])
    val = [e for e in json.loads((train_shards / "manifest.json").read_text())["shards"] if e["split"] == "val"]
    assert sorted(done.fetched) == sorted(e["name"] for e in val) and val
    for entry in val:
        for name in (entry["name"], entry["index"]):
            assert (done.folder / name).read_bytes() == (train_shards / name).read_bytes()
    objects = gcs_server.objects(BUCKET, "shards")
    for key, data in objects.items():  # a copy whose first val shard lost its last byte
        gcs_server.put(BUCKET, f"damaged/{key}", data[:-1] if key == val[0]["name"] else data)
    url = gcs_shards.replace("/shards", "/damaged")
    with pytest.raises(CxrError, match=rf"{url}/{val[0]['name']}: the object holds \d+ bytes, the manifest says"):
        ShardCache(tmp_path / "cache2").ensure(url, splits=["val"])


# ------------------------------------------------------------------------------ reading: loader, train, evaluate
def test_the_wds_loader_yields_the_same_batches_from_gs_as_from_the_folder(gcs_shards, train_shards):
    """Training's reader (per-rank order, skip_batches, augmentation, 2 worker processes) streams from gs://."""
    import torch

    from cxr.data import DataConfig, build_loader

    def batches(shards):
        cfg = DataConfig(shards=str(shards), backend="wds", resolution=64, batch_size=16, num_threads=2, seed=3)
        return list(build_loader(cfg, "train", rank=1, world_size=2, epoch=1, skip_batches=2))

    local, remote = batches(train_shards), batches(gcs_shards)
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["meta"], b["meta"])


def test_training_from_gs_ends_with_the_weights_of_training_from_the_folder(gcs_shards, train_shards, tmp_path):
    """`cxr/train.py` (in one process) with data.shards=gs://…: a few steps and the validation pass."""
    from cxr.train import main as train_main

    def run(shards: str, run_dir: Path) -> Path:
        overrides = [
            f"checkpoint.run_dir={run_dir}",
            f"data.shards={shards}",
            *("data.resolution=64", "data.backend=wds", "data.num_threads=0", "data.batch_size=16"),
            *("train.epochs=1", "train.max_steps=3", "train.threads=1", "logging.progress=false"),
        ]
        assert train_main(["--config", "tiny", *overrides]) == 0
        return run_dir

    local, remote = run(str(train_shards), tmp_path / "local"), run(gcs_shards, tmp_path / "gs")
    a, b = weights(local, "last"), weights(remote, "last")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    pd.testing.assert_frame_equal(
        pd.read_parquet(local / "val_predictions.parquet"), pd.read_parquet(remote / "val_predictions.parquet")
    )
    assert gcs_shards in (remote / "config.yaml").read_text()


def test_evaluate_from_gs_equals_evaluate_from_the_folder(gcs_shards, train_shards, tmp_path):
    member = make_member(tmp_path / "m1", train_shards, seed=1)
    evaluate_to(member, str(train_shards), tmp_path / "local")
    evaluate_to(member, gcs_shards, tmp_path / "gs")
    same_report(tmp_path / "local", tmp_path / "gs")
    assert gcs_shards in (tmp_path / "gs" / "report.md").read_text()


# ------------------------------------------------------------------------------ errors
def test_a_missing_gcs_bucket_or_manifest_is_a_one_line_error_naming_the_url(gcs_shards, capsys):
    """gcsfs reports a missing bucket as a bare 404 (FileNotFoundError of the path), so the error names the
    URL without saying whether the bucket or the prefix is wrong."""
    err = one_line_error(capsys, ["verify", "gs://no-such-bucket/shards"])
    assert re.match(r"error: gs://no-such-bucket/shards\S*: no such object — check the URL", err), err
    err = one_line_error(capsys, ["verify", gcs_shards.replace("/shards", "/nothing")])
    assert "gs://cxr-gcs/nothing/manifest.json: no shards manifest here — run `python -m shards pack" in err


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request as GCS answers a caller without access: 403 with its JSON error body (the
    emulator checks no credentials, so it cannot refuse)."""

    def _refuse(self) -> None:
        body = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects.list access"}})
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args) -> None:
        pass


class _RefusingServer(http.server.ThreadingHTTPServer):
    """The refusing server keeps its own errors: socketserver prints a handler's exception to stderr, which is
    the stderr the test reads for the one-line error. A client that hangs up once it has read the 403 status
    (gcsfs may, before the body) is no error; anything else is kept and fails the test."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Refusing)
        self.errors: list[BaseException] = []

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, ConnectionError):
            self.errors.append(error)


def test_a_gcs_refusal_is_a_one_line_access_denied_error(gcs_server, monkeypatch, capsys):
    """gcsfs raises a 403 as OSError("Forbidden: path\\nreason"): said as access denied, on one line."""
    server = _RefusingServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")
        err = one_line_error(capsys, ["verify", "gs://refused-bucket/shards"])
    finally:
        server.shutdown()
        server.server_close()
    assert not server.errors, server.errors
    assert re.match(r"error: gs://refused-bucket/shards\S*: access denied \(the credentials were rejected", err), err
    assert "GOOGLE_APPLICATION_CREDENTIALS" in err


def test_a_gs_url_without_gcsfs_installed_is_a_one_line_error_naming_the_extra():
    """A fresh `cxr-shards verify gs://…` in which gcsfs cannot be imported (as without the gcs extra)."""
    hook = (
        "import sys\n"
        "sys.modules['gcsfs'] = None  # import gcsfs now raises ImportError, as when it is not installed\n"
        "from shards.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hook, "verify", "gs://some-bucket/shards"],
        cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: gs://some-bucket/shards: no file system for gs:// is installed"), err
    assert "pip install 'cxr[gcs]'" in err
