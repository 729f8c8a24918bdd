"""Serve benchmark: metadata latency under concurrent clients, and download throughput.

A real ``lorahub serve`` process (``--workers N``, default 2: one per core here) over a store
holding one large adapter (``--size-mb``, default 1,000 MB of weights) and ``--count`` more
(default 100,000) bulk-inserted straight into the catalog (``bench_store.bulk_insert``: real
manifests with their true digests and ``name-<i>:v1`` refs, all pointing at the large
adapter's blob), then:

(a) ``--clients`` (default 32) concurrent clients, each on its own keep-alive connection,
    asking for random adapters: ``GET`` model info at ``revision/v1`` and ``HEAD
    /resolve/v1/adapter_model.safetensors`` (what ``hf_hub_download`` sends first). Both are
    measured cold (each request names an adapter no request of the run named before: the
    catalog is read, the card's metadata made) and model info hot too (``--hot`` adapters
    asked again and again: their answers are kept). p50 and p99 per kind, twice: each
    client sending its next request as soon as it has an answer (the server saturated:
    latency is then about clients / throughput), and each waiting ``--think-ms`` (default
    100) between requests. Target: p99 under 20 ms. A client told ``Connection: close``
    (a worker holding more than its share of connections) reconnects, and the reconnect is
    timed with its next request; the reconnects are counted.
    The clients are one asyncio process on the same machine: its CPU is part of the figures.
    A route that reads nothing (``/api/agent-harnesses``) gives the floor: uvicorn,
    Starlette and the client alone.
(b) The 1 GB blob read from disk (the page cache: it is read once before) with 8 MiB
    ``readinto``, beside a ``GET`` of it over loopback read with ``recv_into`` into a
    buffer of the same size; the two alternate, best of ``--runs`` each (load from other
    processes then hits both alike). Then read with ``O_DIRECT``: the disk device itself,
    past the page cache. Target: download >= 0.5x the disk read; both ratios are printed.
    For scale, the same client also downloads the blob from a bare server (one blocking
    ``os.sendfile`` after a fixed header, no HTTP parsing): what this machine's loopback
    carries at best, and lorahub's share of it.
The catalog file is read into the page cache before each pass of (a) and (c), as a serving
machine with memory to spare holds it: this machine's VM evicts idle page cache within
minutes, and a cold request's catalog read then waits on the disk, with the event loop that
ran it (measured with this script: first model infos at 4,400 to 4,800 a second, p99 12 to
13 ms, cached; 2,400 a second, p99 30 ms, with ``--drop-catalog-cache``, which drops the
catalog's pages before each pass instead).
(c) The web pages (``/ui/``): home, the adapter list (first page, page 500, filtered by
    rank, by target and sorted by size, a name search) and adapter pages, each with
    ``--page-clients`` (default 4) readers back to back. Target: p99 under 100 ms.

The first ``HEAD`` of the large adapter's weights hashes its blob (sha256, the LFS oid); its
time is printed, and a second server started on the same store answers at once (the hash is kept
under the store, shared by every worker and restart).

Usage:
    .venv/bin/python benchmarks/bench_serve.py                  # 100,000 adapters, 1 GB blob
    .venv/bin/python benchmarks/bench_serve.py --quick          # 2,000 adapters, 100 MB blob
    .venv/bin/python benchmarks/bench_serve.py --workers 1 --clients 32 --requests 4000
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_store import bulk_insert, write_adapter

import lorahub

MB = 1e6
BIG = "big"
WEIGHTS = "adapter_model.safetensors"
NAMESPACE = "local"
RECONNECTS = [0]  # connections the clients opened again after the server closed one


# ---------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(home: Path, workers: int, log: Path) -> Iterator[int]:
    """``lorahub serve`` over ``home`` on a free port; the port, once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_TOKEN", "LORAHUB_"))}
    env["LORAHUB_HOME"] = str(home)
    cmd = [sys.executable, "-c", "from lorahub.cli import main; main()", "serve"]
    cmd += ["--port", str(port), "--workers", str(workers), "--allow-anonymous"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models?limit=1"):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"lorahub serve did not start:\n{log.read_text()}") from None
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- a lean client


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str
) -> tuple[int, bytes, bool]:
    """``(status, body, closed)``: ``closed`` when the server said ``Connection: close``."""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, closed = 0, False
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        key = key.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"connection":
            closed = value.strip().lower() == b"close"
    body = b"" if method == "HEAD" else await reader.readexactly(length)
    return status, body, closed


async def _client(port: int, paths: list[str], method: str, out: list[float], think: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for path in paths:
            t0 = time.perf_counter()
            if writer.is_closing():  # closed by the server: a new connection, timed too
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                RECONNECTS[0] += 1
            status, body, closed = await _request(reader, writer, method, path)
            if closed:
                writer.close()
            out.append(time.perf_counter() - t0)
            if status != 200:
                raise SystemExit(f"{method} {path}: {status} {body[:200]!r}")
            if think:
                await asyncio.sleep(think)
    finally:
        writer.close()


def latencies(
    port: int, method: str, paths: list[str], clients: int, think: float = 0
) -> list[float]:
    """Each request's seconds, ``clients`` connections sending ``paths``, each waiting
    ``think`` seconds after an answer before its next request (0: back to back)."""
    out: list[float] = []

    async def run() -> None:
        share = [paths[i::clients] for i in range(clients)]
        await asyncio.gather(*(_client(port, s, method, out, think) for s in share))

    asyncio.run(run())
    return out


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


def show(
    label: str,
    xs: list[float],
    wall: float,
    target_ms: float,
    client_cpu: float | None = None,
    reconnects: int | None = None,
) -> None:
    """One line of figures; ``client_cpu``: the clients' CPU seconds in ``wall`` (their
    share of this machine's cores, which the server did not have)."""
    verdict = "ok" if p99(xs) * 1e3 < target_ms else "MISSED"
    client = f"  clients {client_cpu / wall:4.0%} of a core" if client_cpu is not None else ""
    if reconnects is not None:
        client += f", {reconnects} reconnects"
    print(
        f"{label:<26} p50 {statistics.median(xs) * 1e3:6.2f}  p99 {p99(xs) * 1e3:6.2f} ms"
        f"  max {max(xs) * 1e3:6.1f} ms  {len(xs) / wall:6.0f} req/s"
        f"  (target p99 < {target_ms:.0f} ms: {verdict}){client}"
    )


# ---------------------------------------------------------------------------- web pages


def pages(port: int, args: argparse.Namespace, rng: random.Random) -> None:
    """p50/p99 of each kind of web page (``/ui/``), ``--page-clients`` at once, back to back.
    The lists' filters pick from the bulk-inserted adapters' ranks and targets."""
    n = args.page_requests
    ui = "/ui"
    kinds = {
        "home": [f"{ui}/"] * n,
        "adapter list": [f"{ui}/adapters"] * n,
        "list, page 500": [f"{ui}/adapters?page=500"] * n,
        "list, rank=16": [f"{ui}/adapters?rank=16"] * n,
        "list, target, by size": [f"{ui}/adapters?target=q_proj&sort=size"] * n,
        "list, search": [f"{ui}/adapters?q=name-{rng.randrange(args.count)}" for _ in range(n)],
        "adapter page": [
            f"{ui}/adapters/{NAMESPACE}/name-{rng.randrange(args.count)}:v1" for _ in range(n)
        ],
    }
    print(
        f"== web pages: {args.count:,} adapters, {args.page_clients} concurrent clients, "
        f"{n:,} requests each"
    )
    for label, paths in kinds.items():
        catalog_cache(args.catalog, args.drop_catalog_cache)
        latencies(port, "GET", paths[: args.page_clients], args.page_clients)  # warm up
        t0 = time.perf_counter()
        xs = latencies(port, "GET", paths, args.page_clients)
        show(label, xs, time.perf_counter() - t0, 100)


# ---------------------------------------------------------------------------- throughput


def disk_read(path: Path, buf: bytearray) -> float:
    """Seconds to read ``path`` into ``buf`` chunk by chunk, as a program reading it would."""
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


def device_read(path: Path, buf: mmap.mmap) -> float | None:
    """Seconds to read ``path`` with ``O_DIRECT`` (from the disk itself, past the page
    cache) into the page-aligned ``buf``; None where the file system refuses O_DIRECT."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None
    t0 = time.perf_counter()
    try:
        offset = 0
        while n := os.preadv(fd, [buf], offset):
            offset += n
    except OSError:
        return None
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def download(port: int, path: str, size: int, buf: bytearray) -> float:
    """Seconds to ``GET`` ``path`` (``size`` bytes of body) into ``buf``, chunk by chunk."""
    view = memoryview(buf)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit("the server closed the connection before the headers")
            head += chunk
        head, _, first = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"GET {path}: {head[:200]!r}")
        got = len(first)
        while got < size:
            n = sock.recv_into(view)
            if not n:
                raise SystemExit(f"GET {path}: {got} of {size} bytes, then the connection closed")
            got += n
    if got != size:
        raise SystemExit(f"GET {path}: {got} bytes, expected {size}")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- the store


def catalog_cache(catalog: Path, drop: bool) -> None:
    """Read the SQLite catalog (and its WAL) into the page cache, or with ``drop`` ask the
    kernel to drop them from it (clean pages only: nothing is lost)."""
    for path in (catalog, catalog.with_name(catalog.name + "-wal")):
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 8 << 20):
                    pass
        finally:
            os.close(fd)


def metadata(port: int, args: argparse.Namespace, rng: random.Random) -> None:
    """Part (a): model info and HEAD latencies, back to back and with think time."""
    # Cold means never asked before, in any pass: every cold request of the run names an
    # adapter of its own (as long as the catalog holds enough of them).
    fresh = iter(rng.sample(range(args.count), min(args.count, 4 * args.requests + 1024)))

    def cold(template: str, n: int) -> list[str]:
        picks = [next(fresh, -1) for _ in range(n)]
        return [template.format(i if i >= 0 else rng.randrange(args.count)) for i in picks]

    info_cold = f"/api/models/{NAMESPACE}/name-{{}}/revision/v1"
    head_cold = f"/{NAMESPACE}/name-{{}}/resolve/v1/{WEIGHTS}"
    hot = rng.sample(range(args.count), min(args.hot, args.count))
    hot_paths = [
        f"/api/models/{NAMESPACE}/name-{rng.choice(hot)}/revision/v1" for _ in range(args.requests)
    ]
    floor_paths = ["/api/agent-harnesses"] * args.requests  # the framework alone
    hot_once = [f"/api/models/{NAMESPACE}/name-{i}/revision/v1" for i in hot]
    latencies(port, "GET", hot_once * args.workers * 2, args.clients)  # every worker
    print(
        f"== metadata: {args.count:,} adapters, {args.clients} concurrent clients, "
        f"{args.requests:,} requests each, --workers {args.workers}"
    )
    size = args.catalog.stat().st_size / MB
    state = "dropped from" if args.drop_catalog_cache else "read into"
    print(f"(the catalog, {size:,.0f} MB, {state} the page cache before each pass)")
    latencies(port, "GET", cold(info_cold, args.clients * 4), args.clients)  # warm up
    for think in (0, args.think_ms / 1e3):
        if think:
            print(f"-- each client waiting {args.think_ms:.0f} ms between requests")
        else:
            print("-- each client sending its next request as soon as answered")
        for label, method, paths in (
            ("GET model info, cold", "GET", cold(info_cold, args.requests)),
            (f"GET model info, {len(hot):,} hot", "GET", hot_paths),
            ("HEAD resolve, cold", "HEAD", cold(head_cold, args.requests)),
            ("GET, no store read (floor)", "GET", floor_paths),
        ):
            catalog_cache(args.catalog, args.drop_catalog_cache)
            t0, c0, r0 = time.perf_counter(), time.process_time(), RECONNECTS[0]
            xs = latencies(port, method, paths, args.clients, think)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            show(label, xs, wall, 20, cpu, RECONNECTS[0] - r0)


# One connection at a time: the HTTP answer's header, then the file by sendfile, then close.
_BARE_SERVER = """
import os, socket, sys
listener = socket.socket(fileno=int(sys.argv[1]))
path = sys.argv[2]
size = os.path.getsize(path)
head = b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % size
while True:
    conn, _ = listener.accept()
    try:
        with conn, open(path, "rb") as f:
            conn.recv(65536)
            conn.sendall(head)
            sent = 0
            while sent < size:
                sent += os.sendfile(conn.fileno(), f.fileno(), sent, size - sent)
    except OSError:  # the client left: serve the next one
        pass
"""


@contextmanager
def bare_server(blob: Path) -> Iterator[int]:
    """A port where a bare sendfile server (``_BARE_SERVER``, its own process) sends ``blob``."""
    listener = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", _BARE_SERVER, str(listener.fileno()), str(blob)],
        pass_fds=[listener.fileno()],
    )
    try:
        yield listener.getsockname()[1]
    finally:
        proc.kill()
        proc.wait()
        listener.close()


def throughput(port: int, blob: Path, size: int, args: argparse.Namespace) -> None:
    """Part (b): the blob downloaded over loopback beside read from disk."""
    print(f"== download: {size / MB:,.0f} MB blob over loopback, best of {args.runs}")
    buf = bytearray(8 << 20)
    disk_read(blob, buf)  # into the page cache
    path = f"/{NAMESPACE}/{BIG}/resolve/v1/{WEIGHTS}"
    disks, nets, bares = [], [], []
    with bare_server(blob) as bare_port:
        for _ in range(args.runs):  # interleaved: other load on the machine hits all three
            disks.append(disk_read(blob, buf))
            nets.append(download(port, path, size, buf))
            bares.append(download(bare_port, "/", size, buf))
    disk, net, bare = min(disks), min(nets), min(bares)
    aligned = mmap.mmap(-1, 8 << 20)
    devices = [device_read(blob, aligned) for _ in range(min(args.runs, 2))]
    disk_rate, net_rate = size / MB / disk, size / MB / net
    print(f"disk read (page cache)     {disk_rate:8.0f} MB/s   ({disk * 1e3:.0f} ms)")
    timed = [t for t in devices if t is not None]
    if timed:
        device = min(timed)
        print(
            f"disk read (O_DIRECT)       {size / MB / device:8.0f} MB/s   "
            f"({device * 1e3:.0f} ms: the device itself, no page cache)"
        )
    print(f"GET resolve (loopback)     {net_rate:8.0f} MB/s   ({net * 1e3:.0f} ms)")
    print(
        f"bare sendfile (loopback)   {size / MB / bare:8.0f} MB/s   ({bare * 1e3:.0f} ms: "
        f"the loopback's own ceiling; lorahub gets {bare / net:.2f}x of it)"
    )
    verdict = "ok" if net_rate >= 0.5 * disk_rate else "MISSED"
    print(
        f"download / page-cache read {net_rate / disk_rate:8.2f}x        "
        f"(target >= 0.50x: {verdict})"
    )
    if timed:
        ratio = net_rate / (size / MB / min(timed))
        verdict = "ok" if ratio >= 0.5 else "MISSED"
        print(f"download / O_DIRECT read   {ratio:8.2f}x        (target >= 0.50x: {verdict})")


def build(work: Path, count: int, size_mb: float) -> tuple[Path, Path, int]:
    """A store with ``big:v1`` (``size_mb`` of weights) and ``count`` bulk-inserted adapters;
    its home, the big blob's path and its size."""
    home = work / "store"
    src = work / "big-adapter"
    t0 = time.perf_counter()
    size = write_adapter(src, size_mb, "float32", r=64)
    with lorahub.Hub(home) as hub:
        info = hub.add(src, name=f"{BIG}:v1").adapter
        shutil.rmtree(src)
        blob = hub.blobs.path(lorahub.digest.Digest.parse(info.weights_digest))
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        step = 20_000
        for start in range(0, count, step):
            bulk_insert(hub, info.manifest, start, min(count, start + step))
    print(
        f"(store: a {size / MB:,.0f} MB adapter added in {made:.1f} s, {count:,} adapters "
        f"bulk-inserted in {time.perf_counter() - t0:.1f} s)"
    )
    return home, blob, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100_000, help="adapters in the catalog")
    ap.add_argument("--size-mb", type=float, default=1000, help="the downloaded blob's size")
    ap.add_argument("--clients", type=int, default=32, help="concurrent connections")
    ap.add_argument("--requests", type=int, default=6400, help="requests of each kind")
    ap.add_argument("--workers", type=int, default=2, help="lorahub serve --workers")
    ap.add_argument("--runs", type=int, default=5, help="download and disk read runs (best)")
    ap.add_argument(
        "--think-ms",
        type=float,
        default=100,
        help="a second round where each client waits this long between requests",
    )
    ap.add_argument("--store", help="reuse a store a --keep run made (same --count)")
    ap.add_argument(
        "--hot", type=int, default=1000, help="adapters asked again and again (cards cached)"
    )
    ap.add_argument("--page-requests", type=int, default=400, help="requests per page kind")
    ap.add_argument("--page-clients", type=int, default=4, help="concurrent page readers")
    ap.add_argument(
        "--only",
        default="metadata,pages,download",
        help="which parts to run, comma-separated (default: all three)",
    )
    ap.add_argument(
        "--drop-catalog-cache",
        action="store_true",
        help="drop the catalog from the page cache before each pass (default: read it in)",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: small store and blob")
    ap.add_argument("--workdir", help="where the store is made (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the store (to inspect it)")
    args = ap.parse_args()
    # A SIGTERM unwinds like an error: the servers this run started are stopped with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.quick:
        args.count, args.size_mb, args.requests, args.runs = 2000, 100, 640, 2
        args.page_requests = 40

    work = Path(tempfile.mkdtemp(prefix="lorahub-bench-serve-", dir=args.workdir))
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}")
        if args.store:
            home = Path(args.store)
            with lorahub.Hub(home) as hub:
                digest = lorahub.digest.Digest.parse(hub.get(f"{BIG}:v1").weights_digest)
                blob = hub.blobs.path(digest)
            size = blob.stat().st_size
        else:
            home, blob, size = build(work, args.count, args.size_mb)
        args.catalog = home / "lorahub.db"
        log = work / "server.log"
        head_path = f"/{NAMESPACE}/{BIG}/resolve/v1/{WEIGHTS}"
        with serving(home, args.workers, log) as port:
            t0 = time.perf_counter()
            latencies(port, "HEAD", [head_path], 1)
            first = time.perf_counter() - t0
            print(
                f"first HEAD of {BIG}:v1's weights (sha256 of {size / MB:,.0f} MB) {first:6.2f} s"
            )
        with serving(home, args.workers, log) as port:
            t0 = time.perf_counter()
            latencies(port, "HEAD", [head_path], 1)
            again = time.perf_counter() - t0
            print(f"the same, first request after a restart     {again * 1e3:6.1f} ms")

            rng = random.Random(0)
            parts = set(args.only.split(","))
            if "metadata" in parts:
                metadata(port, args, rng)
            if "pages" in parts:
                pages(port, args, rng)
            if "download" in parts:
                throughput(port, blob, size, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"(kept {work})")


if __name__ == "__main__":
    main()
