"""``catalog.db.plain_reads``: the catalog reads ``lorahub serve`` runs per request, on a
pooled driver connection, in one read snapshot, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from factories import cli_runner

import lorahub
from lorahub.catalog.plain import keep_connections, plain_reads
from lorahub.errors import StoreError

pytestmark = pytest.mark.usefixtures("catalog")

REFS = "SELECT name, tag FROM refs ORDER BY name, tag"


def test_the_reads_of_one_block_see_one_snapshot(world, tmp_path):
    home = tmp_path / "store"
    run = cli_runner(home)
    run("add", world / "a", "--name", "sql:v1")
    with lorahub.open(home) as hub, plain_reads(hub.engine) as read:
        before = read(REFS, [])
        assert before == [("sql", "v1")]
        assert run("tag", "sql:v1", "sql:v2").exit_code == 0  # another process commits
        assert read(REFS, []) == before  # still the snapshot the block began with
        assert read("SELECT name FROM refs WHERE tag = ?", ["v1"]) == [("sql",)]
    with lorahub.open(home) as hub, plain_reads(hub.engine) as read:
        assert read(REFS, []) == [("sql", "v1"), ("sql", "v2")]


def test_a_failed_read_is_a_store_error_and_the_pool_goes_on(tmp_path):
    with lorahub.open(tmp_path / "store") as hub:
        for _ in range(3):  # the failed connection is not handed out broken
            with pytest.raises(StoreError, match="failed"), plain_reads(hub.engine) as read:
                read("SELECT nothing FROM no_such_table WHERE x = ?", [1])
            with plain_reads(hub.engine) as read:
                assert read("SELECT COUNT(*) FROM adapters", []) == [(0,)]


def test_a_listing_by_name_gives_each_adapter_all_its_refs_newest_first(world, tmp_path):
    # What `lorahub serve` asks per request: a name's adapters, each with every ref it has
    # (under other names too), as the unfiltered listing gives them.
    home = tmp_path / "store"
    run = cli_runner(home)
    run("add", world / "a", "--name", "sql:v1")
    run("tag", "sql:v1", "sql:v2")
    run("tag", "sql:v1", "other:x")  # a ref under another name comes along
    run("add", world / "b", "--name", "sql:v3")
    run("add", world / "ad2", "--name", "elsewhere:v1")
    with lorahub.open(home) as hub:
        every = hub.list_adapters()
        expected = [i for i in every if any(r.startswith("sql:") for r in i.refs)]
        assert len(expected) == 2
        assert hub.list_adapters(["name=sql"]) == expected
        assert hub.list_adapters(["name=sql"], limit=1) == expected[:1]
        assert expected[1].refs == ("other:x", "sql:v1", "sql:v2")
        assert hub.list_adapters(["name=sql", "target=o_proj"]) == expected[:1]
        assert hub.list_adapters(["name=other"]) == expected[1:]
        assert hub.list_adapters(["name=nobody"]) == []


def _in_a_keeping_thread(work: Callable[[], None]) -> None:
    """Run ``work`` in a thread that keeps its own connections (as serve's event loop)."""
    failed: list[BaseException] = []

    def target() -> None:
        keep_connections()
        try:
            work()
        except BaseException as exc:  # re-raised in the test's thread
            failed.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if failed:
        raise failed[0]


def test_a_generation_read_inside_a_block_is_not_held_to_its_snapshot(world, tmp_path):
    """A read nested in a block on the same thread (the generation, another block) takes
    another connection: the thread's own is in the block's snapshot."""
    from lorahub.catalog.generation import current

    home = tmp_path / "store"
    run = cli_runner(home)
    run("add", world / "a", "--name", "sql:v1")

    def work() -> None:
        with lorahub.open(home) as hub, plain_reads(hub.engine) as read:
            before = current(hub.engine)
            assert read(REFS, []) == [("sql", "v1")]
            assert run("tag", "sql:v1", "sql:v2").exit_code == 0
            assert current(hub.engine) > before  # another process's commit shows at once
            with plain_reads(hub.engine) as nested:
                assert nested(REFS, []) == [("sql", "v1"), ("sql", "v2")]
            assert read(REFS, []) == [("sql", "v1")]  # the outer block's snapshot stands

    _in_a_keeping_thread(work)


@pytest.mark.sqlite_only
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
def test_closing_the_store_closes_every_thread_s_catalog_connection(tmp_path):
    def open_catalogs() -> int:
        return sum(
            1
            for fd in Path("/proc/self/fd").iterdir()
            if os.path.realpath(fd).startswith(str(tmp_path / "store" / "lorahub.db"))
        )

    hub = lorahub.open(tmp_path / "store")
    for _ in range(4):  # each keeping thread keeps a connection of its own
        _in_a_keeping_thread(hub.list_adapters)
    assert open_catalogs() >= 4
    hub.close()
    assert open_catalogs() == 0
