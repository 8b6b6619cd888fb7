"""A real S3 wire-protocol server on 127.0.0.1 for the object-storage tests (moto's standalone server).

`s3_server` (a fixture in conftest.py) starts one per test session on a free loopback port and points
every boto3/botocore/s3fs client of this process and its children at it through the standard
environment (`AWS_ENDPOINT_URL`, fake static credentials), so the code under test uses the ordinary
provider chain — nothing in cxr knows it talks to a test server. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

FAKE_KEY_ID = "cxrtestkeyid"
FAKE_SECRET = "cxrtestsecretnevershown"  # tests check it appears in no log, manifest or run dir


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=FAKE_KEY_ID,
            aws_secret_access_key=FAKE_SECRET,
            region_name="us-east-1",
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@contextmanager
def running_s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # returns once the socket is bound and serving
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with aws_env(endpoint) as env:
            yield S3Server(endpoint, env)
    finally:
        server.stop()


@contextmanager
def aws_env(endpoint: str) -> Iterator[dict[str, str]]:
    """This process's standard AWS variables pointed at ``endpoint`` with the fake credentials; restored after."""
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _restart_fork_server()
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _restart_fork_server()


def _restart_fork_server() -> None:
    """The wds loader's workers fork from multiprocessing's fork server, which keeps the environment it
    was started with: an earlier test's loader started it without these variables, and its workers then
    find no credentials. Stop it, so the next loader starts one with this environment (a job sets its
    credentials before it starts, so only a test session needs this)."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # CPython 3.8+: the module's own shutdown
    if stop is not None:
        stop()


class CountingS3:
    """moto's S3 server on a free loopback port, counting (method, path) of every request (the cache
    tests see "fetched once" and "no request" from the bucket's side)."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: collections.Counter = collections.Counter()
        lock = threading.Lock()

        def counting(environ, start_response):
            with lock:
                self.requests[(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))] += 1
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = "http://127.0.0.1:%d" % self.server.server_address[1]

    def gets(self, key_suffix: str) -> int:
        return sum(n for (m, p), n in self.requests.items() if m == "GET" and p.endswith(key_suffix))

    def tar_gets(self) -> dict[str, int]:
        out: collections.Counter = collections.Counter()
        for (m, p), n in self.requests.items():
            if m == "GET" and p.endswith(".tar"):
                out[p.rsplit("/", 1)[-1]] += n
        return dict(out)
