"""``catalog.db.plain_reads``: the catalog reads ``lorahub serve`` runs per request, on a
pooled driver connection, in one read snapshot, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import pytest
from factories import cli_runner

import lorahub
from lorahub.catalog.db import plain_reads
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
