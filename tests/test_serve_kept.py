"""The metadata answers ``lorahub serve`` keeps: never older than the catalog.

Each worker keeps model-info, tree, refs and ``HEAD resolve`` answers while the catalog's
generation (migration 0005's triggers) stands; a change by any process must show in the
very next answer of every worker."""

from __future__ import annotations

import itertools
import json
import os

import pytest
from factories import cli_runner
from servekit import Server, serving
from starlette.responses import JSONResponse, Response

import lorahub
from lorahub.catalog.generation import current
from lorahub.serve.kept import KeptAnswers
from lorahub.serve.mapping import commit_id

pytestmark = pytest.mark.usefixtures("catalog")

WEIGHTS = "adapter_model.safetensors"


def _answers(server: Server, times: int = 8) -> set[tuple[int, str, str, str]]:
    """What ``times`` fresh connections (spread over the workers) are told about
    ``local/sql:v1``: the model info's sha, the HEAD's commit and linked size, the refs."""
    seen = set()
    for _ in range(times):
        status, _, body = server.request("GET", "/api/models/local/sql/revision/v1")
        sha = json.loads(body)["sha"] if status == 200 else str(status)
        st2, head, _ = server.request("HEAD", f"/local/sql/resolve/v1/{WEIGHTS}")
        commit = f"{st2} {head.get('x-repo-commit')} {head.get('x-linked-size')}"
        st3, _, refs = server.request("GET", "/api/models/local/sql/refs")
        tags = sorted(t["targetCommit"] for t in json.loads(refs)["tags"]) if st3 == 200 else []
        seen.add((status, sha, commit, ",".join(tags)))
    return seen


def test_every_worker_answers_a_change_by_another_process_at_once(world, tmp_path):
    home = tmp_path / "store"
    run = cli_runner(home)
    run("add", world / "a", "--name", "sql:v1")
    run("add", world / "ad2", "--name", "other:v1")
    with lorahub.open(home) as hub:
        a, b = hub.get("sql:v1"), hub.get("other:v1")
    db = {k: v for k, v in os.environ.items() if k == "LORAHUB_DATABASE_URL"}  # PostgreSQL
    with serving(home, tmp_path / "work", "--allow-anonymous", "--workers", "2", env=db) as server:
        first = _answers(server)
        assert first == {
            (200, commit_id(a.digest), f"200 {commit_id(a.digest)} {a.size}", commit_id(a.digest))
        }
        # Moved by a command (another process, not the server): no worker may answer as before.
        assert run("tag", "other:v1", "sql:v1").exit_code == 0
        assert _answers(server) == {
            (200, commit_id(b.digest), f"200 {commit_id(b.digest)} {b.size}", commit_id(b.digest))
        }
        assert run("rm", "sql:v1", "--yes").exit_code == 0
        gone = _answers(server)
        assert {s for s, *_ in gone} == {404} or {s for s, *_ in gone} == {401}, gone


def test_each_catalog_table_an_answer_reads_moves_the_generation(world, tmp_path):
    home = tmp_path / "store"
    run = cli_runner(home)
    with lorahub.open(home) as hub:
        moves = [current(hub.engine)]

        def step(*args: object) -> None:
            assert run(*args).exit_code == 0, args
            moves.append(current(hub.engine))

        step("add", world / "a", "--name", "sql:v1")  # blobs, adapters, modules, refs
        step("tag", "sql:v1", "sql:v2")  # refs
        step("rm", "sql:v2", "--yes")  # refs
        step("base", "add", world / "llama", "--name", "llama")  # base_models
        step("rm", "sql:v1", "--yes")  # adapters
    assert all(isinstance(n, int) for n in moves)
    assert all(later > earlier for earlier, later in itertools.pairwise(moves)), moves


def test_tokens_do_not_move_the_generation(tmp_path):
    home = tmp_path / "store"
    run = cli_runner(home)
    with lorahub.open(home) as hub:
        before = current(hub.engine)
        assert run("token", "add", "ci", "--write").exit_code == 0
        assert run("token", "rm", "ci", "-y").exit_code == 0
        assert current(hub.engine) == before


# ---------------------------------------------------------------- the keeper itself


def test_an_answer_is_computed_once_per_generation_and_files_are_never_kept(tmp_path, world):
    home = tmp_path / "store"
    with lorahub.open(home) as hub:
        kept = KeptAnswers(hub.engine)
        calls: list[str] = []

        def compute(label: str) -> Response:
            calls.append(label)
            return JSONResponse({"label": label})

        first = kept.answer("k", lambda: compute("one"))
        assert kept.answer("k", lambda: compute("two")) is first
        assert calls == ["one"]
        hub.add(world / "a", name="x:v1")  # any write moves the generation
        assert json.loads(kept.answer("k", lambda: compute("three")).body) == {"label": "three"}
        assert calls == ["one", "three"]

        class Streamed(Response):
            pass

        kept.answer("f", lambda: Streamed(b"x"))
        assert kept.answer("f", lambda: Response(b"y")).body == b"y"  # not kept: computed

        kept.answer("e", lambda: Response(b"no", status_code=404))
        assert kept.answer("e", lambda: Response(b"ok")).body == b"ok"  # errors not kept


def test_the_budget_drops_the_least_recently_used(tmp_path):
    with lorahub.open(tmp_path / "store") as hub:
        kept = KeptAnswers(hub.engine, budget=3000)
        body = b"x" * 900
        for key in "abc":
            kept.answer(key, lambda: Response(body))
        kept.answer("a", lambda: Response(b"recomputed"))  # a is used again: c... b goes
        kept.answer("d", lambda: Response(body))
        assert kept.answer("b", lambda: Response(b"new")).body == b"new"
        assert kept.answer("a", lambda: Response(b"new")).body == body
