"""A real S3-protocol server for the tests: moto's standalone server (``python -m
moto.server``) on 127.0.0.1 and a free port, started by the test session itself, talked to
through boto3 over HTTP like any S3 endpoint.

``S3Server.env(bucket)`` gives the AWS variables a store (or a ``lorahub`` subprocess) needs;
``S3Server.bucket()`` makes a new, empty bucket for one test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ACCESS_KEY = "lorahub-test-access"
SECRET_KEY = "lorahub-test-secret-Zq7RkV2m"  # checked absent from every output
REGION = "us-east-1"
# moto refuses parts under S3's 5 MiB minimum too; the tests cross it with small blobs.
PART_SIZE = "5MiB"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """The AWS variables boto3 reads: this endpoint, test credentials, a region."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def bucket(self) -> str:
        name = f"lorahub-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's server on a free loopback port, until the block ends."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Its request log goes to a file: a pipe nobody reads would fill and block it.
    with tempfile.TemporaryFile() as log:
        env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    raise RuntimeError(f"moto_server exited ({proc.returncode}): {err[-2000:]}")
                try:
                    with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"moto_server did not answer on {endpoint}") from None
                    time.sleep(0.1)
            yield S3Server(endpoint, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
