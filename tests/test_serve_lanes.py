"""Which thread answers a read (``serve/lanes.py``), and kept answers given from the event loop.

Metadata reads share a few threads; a download, or the hashing a new blob's first ``HEAD``
needs, must never hold them. A kept answer is given without a thread, and never to a caller
the route's access check would refuse."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from factories import cli_runner
from servekit import serving
from starlette.requests import Request
from starlette.responses import Response

import lorahub
from lorahub.serve.files import SHA256_FOLDER, Sha256Cache
from lorahub.serve.lanes import ReadLanes

WEIGHTS = "adapter_model.safetensors"


def _request(method: str, path: str) -> tuple[Request, list[str]]:
    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": []}
    return Request(scope), path.split("/")[1:]


def _ask(lanes: ReadLanes, method: str, path: str) -> object:
    return lanes(*_request(method, path))


def test_hashing_a_new_blob_never_holds_the_metadata_threads(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"weights" * 1000)
    cache = Sha256Cache(tmp_path / "sha256")
    hashing, release = threading.Event(), threading.Event()

    def slow_blob() -> Path:  # the blob's file: here hashing waits, as on a large blob
        hashing.set()
        assert release.wait(20)
        return blob

    def read(request: Request) -> Response:
        if request.url.path.startswith("/local/new"):
            return Response(cache.get("ab" * 16, slow_blob))
        return Response(b"metadata")

    lanes = ReadLanes(read, threads=1)
    answers: dict[str, bytes] = {}

    async def main() -> None:
        async def head(path: str) -> None:
            answers[path] = (await _ask(lanes, "HEAD", path)).body  # type: ignore[attr-defined]

        async with anyio.create_task_group() as tg:
            tg.start_soon(head, f"/local/new/resolve/v1/{WEIGHTS}")
            await anyio.to_thread.run_sync(hashing.wait, 20)
            with anyio.fail_after(10):  # the one metadata thread is free while it hashes
                await head("/api/models/local/other")
            release.set()

    anyio.run(main)
    assert answers["/api/models/local/other"] == b"metadata"
    expected = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert answers[f"/local/new/resolve/v1/{WEIGHTS}"] == expected.encode()
    assert cache.entry("ab" * 16).read_text().strip() == expected  # kept for every process


def test_a_download_never_holds_the_metadata_threads():
    started, release = threading.Event(), threading.Event()

    def read(request: Request) -> Response:
        if request.method == "GET" and "/resolve/" in request.url.path:
            started.set()
            assert release.wait(20)  # a blob fetched from an object store, a merge awaited
            return Response(b"file")
        return Response(b"metadata")

    lanes = ReadLanes(read, threads=1)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_ask, lanes, "GET", f"/local/a/resolve/v1/{WEIGHTS}")
            await anyio.to_thread.run_sync(started.wait, 20)
            with anyio.fail_after(10):
                for method, path in (
                    ("HEAD", f"/local/a/resolve/v1/{WEIGHTS}"),
                    ("GET", "/api/models/local/a"),
                ):
                    assert (await _ask(lanes, method, path)).body == b"metadata"  # type: ignore[attr-defined]
            release.set()

    anyio.run(main)


def test_metadata_reads_run_in_at_most_the_lane_s_threads():
    running, most = 0, 0
    lock = threading.Lock()

    def read(request: Request) -> Response:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return Response(b"metadata")

    lanes = ReadLanes(read, threads=3)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(_ask, lanes, "GET", f"/api/models/local/a{i}")

    anyio.run(main)
    assert most == 3


# ------------------------------------------------------------------ a real server


def _db() -> dict[str, str]:
    """The catalog the server is to open: PostgreSQL's URL when the test runs on it."""
    return {k: v for k, v in os.environ.items() if k == "LORAHUB_DATABASE_URL"}


@pytest.fixture
def store(world, tmp_path, catalog) -> tuple[Path, dict[str, str]]:
    home = tmp_path / "store"
    run = cli_runner(home)
    run("add", world / "a", "--name", "sql:v1")
    tokens = {
        "reader": run("token", "add", "reader", "-q").stdout.strip(),
        "team": run("token", "add", "team-only", "--namespace", "team", "-q").stdout.strip(),
    }
    return home, tokens


def test_a_kept_answer_is_never_given_to_a_caller_the_route_refuses(store, tmp_path):
    home, tokens = store
    info = "/api/models/local/sql/revision/v1"
    head = f"/local/sql/resolve/v1/{WEIGHTS}"
    with serving(home, tmp_path / "work", env=_db()) as server:  # no anonymous reads
        bearer = {"Authorization": f"Bearer {tokens['reader']}"}
        for _ in range(3):  # computed, then kept (and given from the event loop)
            assert server.request("GET", info, headers=bearer)[0] == 200
            assert server.request("HEAD", head, headers=bearer)[0] == 200
        for headers, status in (
            ({}, 401),  # anonymous
            ({"Authorization": "Bearer hf_wrong"}, 401),
            ({"Authorization": f"Bearer {tokens['reader']}x"}, 401),
            ({"Authorization": f"Bearer {tokens['team']}"}, 404),  # another namespace's
            ({"Authorization": "Basic abc"}, 401),
        ):
            for method, path in (("GET", info), ("HEAD", head)):
                got, _, body = server.request(method, path, headers=headers)
                assert got == status, (method, headers, body)
        assert tokens["reader"] not in server.output()


def test_model_info_names_files_without_making_them_or_hashing(store, tmp_path):
    """Model info without ``blobs`` answers from the catalog: no blob is hashed. Its
    ``cardData`` is the served card's metadata, with or without ``blobs``."""
    from huggingface_hub import ModelCard

    home, _ = store
    with lorahub.open(home) as hub:
        info = hub.get("sql:v1")
    kept = home.joinpath(*SHA256_FOLDER)
    with serving(home, tmp_path / "work", "--allow-anonymous", env=_db()) as server:
        status, _, body = server.request("GET", "/api/models/local/sql/revision/v1")
        assert status == 200
        plain = json.loads(body)
        assert [s["rfilename"] for s in plain["siblings"]] == [
            "adapter_config.json",
            WEIGHTS,
            "README.md",
            "lorahub.json",
        ]
        assert not [p for p in kept.rglob("*") if p.is_file() and p.parent.name != ".locks"]
        status, _, body = server.request("GET", "/api/models/local/sql/revision/v1?blobs=true")
        full = json.loads(body)
        weights = next(s for s in full["siblings"] if s["rfilename"] == WEIGHTS)
        assert weights["size"] == info.size
        status, _, readme = server.request("GET", "/local/sql/resolve/v1/README.md")
        assert status == 200
    card = ModelCard(readme.decode()).data.to_dict()
    assert plain["cardData"] == full["cardData"] == json.loads(json.dumps(card))
    assert card["library_name"] == "peft"
