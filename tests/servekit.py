"""A real ``lorahub serve`` process on 127.0.0.1 for tests, and the environment a client
process needs to reach it (``HF_ENDPOINT``, its own ``HF_HOME``, no stray token)."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(parent: int) -> list[int]:
    """The pids whose parent is ``parent`` (Linux: read from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(entry))
    return out


def client_env(home: Path, url: str, hf_home: Path) -> dict[str, str]:
    """The environment of a client process: this store, this server, a fresh HF cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_TOKEN", "LORAHUB_"))}
    env |= {"LORAHUB_HOME": str(home), "HF_ENDPOINT": url, "HF_HOME": str(hf_home)}
    env["HF_HUB_DISABLE_XET"] = "1"
    return env


@dataclass
class Server:
    """A running ``lorahub serve``: its URL, process and log file."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """A raw request (the path sent as is, never normalised)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            res = conn.getresponse()
            return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
        finally:
            conn.close()


def wait_ready(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{server.url}/api/models", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 without anonymous reads)
        except OSError:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(server.output()) from None
            time.sleep(0.2)


@contextlib.contextmanager
def serving(
    home: Path, work: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """``lorahub serve --port <free> *args`` over the store ``home``; stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / f"server-{port}.log"
    cmd = [sys.executable, "-c", "from lorahub.cli import main; main()"]
    base_env = client_env(home, url, work / "hf-server")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, "serve", "--port", str(port), *args],
            env=base_env | (env or {}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = Server(url, port, proc, log_path)
        try:
            wait_ready(server)
            yield server
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def client_logits(script: str, args: list[str], env: dict[str, str], out: Path) -> object:
    """The logits tensor a client ``script`` (run in its own process with ``env``, given
    ``args`` and then ``out``) saved with ``torch.save`` to ``out``."""
    res = subprocess.run(
        [sys.executable, "-c", script, *args, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    import torch

    return torch.load(out)
