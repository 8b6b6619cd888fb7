"""A Google Cloud Storage JSON-API server on 127.0.0.1 for the gs:// tests (gcp-storage-emulator from PyPI).

`gcs_server` (a fixture in conftest.py) starts one per test session as a child process on a free loopback
port, waits until it answers its health check, and points every gcsfs / google-cloud-storage client of
this process and its children at it through their standard environment: ``STORAGE_EMULATOR_HOST`` (both
clients send every request there). Nothing in cxr knows it talks to a test server; nothing leaves
127.0.0.1. Two more variables, both the libraries' own switches, adapt the clients to what a stub can do:

- ``NO_GCE_CHECK=true``: with no credentials in the environment gcsfs falls back to anonymous
  requests (the emulator checks none) without first probing the Compute Engine metadata server;
- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs ≥ 2026.1 otherwise asks the gRPC Storage Control
  API for each bucket's layout (zonal / hierarchical), which the emulator does not serve — every call
  would log a warning and fall back to the plain JSON API the tests exercise anyway.

The tests' references read and write objects with Google's own client (google-cloud-storage), not gcsfs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from helpers import free_port
from s3_server import _restart_fork_server

START_TIMEOUT = 30.0  # seconds for the child to answer its health check


@dataclass(frozen=True)
class GCSServer:
    endpoint: str
    env: dict[str, str]

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="cxr-test", credentials=AnonymousCredentials())

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(name)
        return f"gs://{name}"

    def objects(self, bucket: str, prefix: str) -> dict[str, bytes]:
        """{key below prefix/: bytes} of every object under ``prefix``."""
        client = self.client()
        return {
            blob.name[len(prefix) + 1 :]: blob.download_as_bytes()
            for blob in client.list_blobs(bucket, prefix=prefix + "/")
        }

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().bucket(bucket).blob(key).download_as_bytes()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().bucket(bucket).blob(key).upload_from_string(data)


def _wait_ready(endpoint: str, proc: subprocess.Popen, log) -> None:
    """Poll the emulator's health check (GET / → "OK") until it answers or the child exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}: {log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(endpoint + "/", timeout=1) as resp:
                if resp.read() == b"OK":
                    return
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"gcp-storage-emulator did not answer on {endpoint} within {START_TIMEOUT:.0f} s")
        time.sleep(0.05)  # a poll interval, not a guess at the start-up time


@contextmanager
def running_gcs_server() -> Iterator[GCSServer]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port)]
    # its stderr goes to a file, not a pipe nobody drains: it prints a traceback for every connection a
    # client closes early (a stream that stops reading), and a full pipe would block the server
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([*cmd, "--in-memory", "--quiet"], stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_ready(endpoint, proc, log)
            with gcs_env(endpoint) as env:
                yield GCSServer(endpoint, env)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@contextmanager
def gcs_env(endpoint: str) -> Iterator[dict[str, str]]:
    """This process's standard GCS variables pointed at ``endpoint``; restored after."""
    env = {
        "STORAGE_EMULATOR_HOST": endpoint,
        "NO_GCE_CHECK": "true",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _restart_fork_server()  # the wds loader's workers must see these variables (see s3_server)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _restart_fork_server()
