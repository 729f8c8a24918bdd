"""``lorahub serve --workers 2``: two processes over one store. Downloads spread over both
come back byte exact (sent with ``sendfile``, ``Range`` honoured); the weights' sha256 is
kept under the store, so it is hashed once for every worker and restart; the ``hf`` CLI
downloads a revision into a folder."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from factories import cli_runner
from servekit import Server, children, client_env, serving

import lorahub
from lorahub.digest import Digest
from lorahub.formats.peft_folder import FILES
from lorahub.serve.files import SHA256_FOLDER
from lorahub.serve.mapping import commit_id

REPO = "local/sql-expert"
WEIGHTS = "adapter_model.safetensors"
PATH = f"/{REPO}/resolve/v1/{WEIGHTS}"


class Store:
    def __init__(self, home: Path, work: Path) -> None:
        self.home, self.work = home, work
        with lorahub.open(home) as hub:
            self.info = hub.get("sql-expert:v1")
            self.key = Digest.parse(self.info.weights_digest).hex
            self.blob = hub.blobs.path(Digest.parse(self.info.weights_digest))
        self.weights = self.blob.read_bytes()
        self.sha256 = hashlib.sha256(self.weights).hexdigest()
        self.entry = home.joinpath(*SHA256_FOLDER, self.key[:2], self.key[2:])


@pytest.fixture
def store(world: Path, tmp_path: Path) -> Store:
    """A store holding ``sql-expert:v1`` (adapter ``a``); nothing served from it yet."""
    home = tmp_path / "store"
    cli_runner(home)("add", world / "a", "--name", "sql-expert:v1")
    return Store(home, tmp_path)


@pytest.fixture
def two_workers(store: Store) -> Iterator[Server]:
    with serving(store.home, store.work, "--allow-anonymous", "--workers", "2") as server:
        # The first worker up answers the readiness probe; a worker accepts connections only
        # once its own startup is done, and the tests here need both taking them.
        deadline = time.monotonic() + 60
        while server.output().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        yield server


def _connections_by_worker(server: Server, ports: list[int]) -> dict[int, int]:
    """How many of the client connections (by local port) each worker process holds the
    server end of: /proc/net/tcp gives each socket's inode, /proc/<pid>/fd its owner."""
    wanted: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, remote, inode = cols[1], cols[2], cols[9]
            if int(local.rsplit(":", 1)[1], 16) == server.port and int(
                remote.rsplit(":", 1)[1], 16
            ) in set(ports):
                wanted.add(f"socket:[{inode}]")
    counts: dict[int, int] = {}
    for pid in children(server.proc.pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    counts[pid] = counts.get(pid, 0) + 1
            except OSError:
                continue
    return counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_downloads_spread_over_both_workers_are_byte_exact(store, two_workers, loopback_only):
    """64 keep-alive connections each download the weights twice (once whole, once a
    range); both worker processes serve a fair share of them (each listens on a socket of
    its own, which the kernel fills evenly), and every byte is right."""
    server = two_workers
    conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=60) for _ in range(64)]

    def fetch(conn: http.client.HTTPConnection) -> tuple[bytes, bytes, str, int]:
        conn.request("GET", PATH)
        res = conn.getresponse()
        whole, etag = res.read(), res.getheader("X-Linked-Etag", "")
        conn.request("GET", PATH, headers={"Range": "bytes=7-"})
        part = conn.getresponse()
        return whole, part.read(), etag, part.status

    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(fetch, conns))
        ports = [c.sock.getsockname()[1] for c in conns if c.sock is not None]
        by_worker = _connections_by_worker(server, ports)
    finally:
        for c in conns:
            c.close()
    for whole, part, etag, status in results:
        assert whole == store.weights
        assert status == 206 and part == store.weights[7:]
        assert etag == f'"{store.sha256}"'
    assert len(by_worker) == 2, (by_worker, server.output())
    # A connection a worker over its share closed after its last answer stays closed.
    assert sum(by_worker.values()) == len(ports) > 48
    # A fair split by the kernel's hash gives fewer than 12 to one worker once in millions;
    # a shared socket gives whichever worker wakes first a burst of them.
    assert min(by_worker.values()) >= 12, by_worker


def test_sha256_is_hashed_once_and_shared_by_workers_and_restarts(store, two_workers):
    """The first requests, racing on both workers, leave one entry that later requests and
    a restarted server read without writing it again."""
    server = two_workers
    assert not store.entry.exists()

    def head(_: int) -> str:
        status, headers, _body = server.request("HEAD", PATH)
        assert status == 200, headers
        return headers["x-linked-etag"]

    with ThreadPoolExecutor(32) as pool:
        assert set(pool.map(head, range(64))) == {f'"{store.sha256}"'}
    assert store.entry.read_text() == f"{store.sha256}\n"
    before = store.entry.stat()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(head, range(64)))
    after = store.entry.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not [p for p in store.entry.parent.iterdir() if p.name.endswith(".tmp")]


def test_every_worker_reads_the_kept_sha256_and_a_damaged_one_is_recomputed(store):
    """A kept value is what every worker answers (none hashes the blob again); an entry
    that is not 64 hex is never sent: it is recomputed and replaced."""
    kept = "ab" * 32  # a value only the entry can have given
    store.entry.parent.mkdir(parents=True)
    store.entry.write_text(kept + "\n")
    with serving(store.home, store.work, "--allow-anonymous", "--workers", "2") as server:
        etags = {server.request("HEAD", PATH)[1]["x-linked-etag"] for _ in range(16)}
    assert etags == {f'"{kept}"'}
    store.entry.write_text("not a sha256\n")
    with serving(store.home, store.work, "--allow-anonymous", "--workers", "2") as server:
        status, headers, body = server.request("GET", PATH)
    assert status == 200 and body == store.weights
    assert headers["x-linked-etag"] == f'"{store.sha256}"'
    assert store.entry.read_text() == f"{store.sha256}\n"


def test_range_requests_and_head(store, two_workers):
    server, data, size = two_workers, store.weights, len(store.weights)
    cases = {
        "bytes=0-": (206, data, f"bytes 0-{size - 1}/{size}"),
        "bytes=10-99": (206, data[10:100], f"bytes 10-99/{size}"),
        f"bytes=5-{size + 1000}": (206, data[5:], f"bytes 5-{size - 1}/{size}"),
        "bytes=-10": (206, data[-10:], f"bytes {size - 10}-{size - 1}/{size}"),
    }
    for wanted, (status, body, content_range) in cases.items():
        got = server.request("GET", PATH, headers={"Range": wanted})
        assert got[0] == status and got[2] == body, wanted
        assert got[1]["content-range"] == content_range, wanted
        assert got[1]["content-length"] == str(len(body)), wanted
    status, headers, _ = server.request("GET", PATH, headers={"Range": f"bytes={size}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    stale = {"Range": "bytes=10-20", "If-Range": '"' + "0" * 64 + '"'}
    status, _, body = server.request("GET", PATH, headers=stale)
    assert status == 200 and body == data
    fresh = {"Range": "bytes=10-20", "If-Range": f'"{store.sha256}"'}
    status, _, body = server.request("GET", PATH, headers=fresh)
    assert status == 206 and body == data[10:21]
    status, headers, body = server.request("HEAD", PATH)
    assert status == 200 and body == b"" and headers["content-length"] == str(size)
    assert headers["x-repo-commit"] == commit_id(store.info.digest)


def test_a_client_gone_mid_download_leaves_the_server_serving(store, two_workers):
    import socket

    for _ in range(8):
        with socket.create_connection(("127.0.0.1", two_workers.port)) as sock:
            sock.sendall(f"GET {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(10)
    status, _, body = two_workers.request("GET", PATH)
    assert status == 200 and body == store.weights


def test_hf_cli_downloads_a_revision_into_a_folder(store, two_workers, tmp_path):
    from lorahub.remote.push import write_push_files

    out = tmp_path / "downloaded"
    env = client_env(store.home, two_workers.url, tmp_path / "hf-home")
    env |= {"HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost"}
    env |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    hf = Path(sys.executable).with_name("hf")
    done = subprocess.run(
        [str(hf), "download", REPO, "--revision", "v1", "--local-dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(FILES)
    assert (out / WEIGHTS).read_bytes() == store.weights
    (tmp_path / "push").mkdir()
    with lorahub.open(store.home) as hub:
        pushed = write_push_files(
            store.info,
            store.blob,
            tmp_path / "push",
            title=REPO,
            recorded_base=hub.base_repo_id(store.info),
        )
    for name, path in pushed.items():
        assert (out / name).read_bytes() == path.read_bytes(), name
    assert json.loads((out / "lorahub.json").read_text())["digest"] == store.info.digest


@pytest.mark.parametrize("kind", ["httptools", "h11"])
def test_the_protocol_offers_zero_copy_send_and_blobs_use_it(kind, tmp_path, loopback_only):
    """uvicorn with lorahub's protocols (``lorahub serve`` runs the httptools one, the h11
    one where httptools is missing) offers the ASGI zero-copy extension, and a blob sent
    through it arrives whole, or the range asked, on one keep-alive connection, pipelined
    requests included."""
    import threading
    import time

    import uvicorn
    from servekit import free_port
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    from lorahub.serve import zerocopy
    from lorahub.serve.zerocopy import ZEROCOPY, BlobResponse

    protocol = {
        "httptools": zerocopy.HttpToolsZeroCopyProtocol,
        "h11": zerocopy.H11ZeroCopyProtocol,
    }[kind]
    if kind == "httptools":
        assert zerocopy.PROTOCOL is protocol  # what `lorahub serve` runs

    data = os.urandom(3 << 20)  # more than a socket buffer holds
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    offered: list[bool] = []

    async def endpoint(request: Request) -> BlobResponse:
        offered.append(ZEROCOPY in request.scope.get("extensions", {}))
        return BlobResponse(blob, {"ETag": '"x"'})

    port = free_port()
    app = Starlette(routes=[Route("/b", endpoint)])
    config = uvicorn.Config(app, port=port, http=protocol, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/b")
        assert conn.getresponse().read() == data
        conn.request("GET", "/b", headers={"Range": "bytes=100-"})
        res = conn.getresponse()
        assert res.status == 206 and res.read() == data[100:]
        conn.close()
        # Two requests sent at once (pipelined): each answer whole, in order.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            ask = b"GET /b HTTP/1.1\r\nHost: x\r\n%s\r\n"
            sock.sendall(ask % b"Range: bytes=10-19\r\n" + ask % b"")
            got = b""
            while got.count(b"HTTP/1.1 ") < 2 or not got.endswith(data[-1000:]):
                chunk = sock.recv(1 << 20)
                assert chunk, got[:300]
                got += chunk
        first, _, rest = got.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 206") and rest.startswith(data[10:20])
        second, _, body = rest[10:].partition(b"\r\n\r\n")
        assert second.startswith(b"HTTP/1.1 200") and body == data
    finally:
        server.should_exit = True
        thread.join(30)
    assert offered == [True, True, True, True]
