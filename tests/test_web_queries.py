"""The catalog reads behind the web list (``serve/web/queries.py``), without a browser: the
count that stops at its cap, the partial page that needs no count, and filters and sorts
that agree with a plain reading of every adapter."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

import lorahub
from lorahub.catalog import queries as catalog
from lorahub.catalog import reads
from lorahub.serve.web import queries

pytestmark = pytest.mark.usefixtures("catalog")

NAMES = ("a", "ad2", "b", "wide-ad", "dora-ad")


@pytest.fixture
def five(hub: lorahub.Hub, world) -> lorahub.Hub:
    for n in NAMES:
        hub.add(world / n, name=f"{n}:v1")
    return hub


def _page(hub: lorahub.Hub, *args: Any, counted: list[str] | None = None) -> Any:
    with Session(hub.engine) as session:
        run = catalog.runner(session)

        def spy(sql: str, params: Any) -> Any:
            if counted is not None and "COUNT(*)" in sql:
                counted.append(sql)
            return run(sql, params)

        return queries.page(spy, *args)


def test_a_count_stops_at_the_cap(five, monkeypatch):
    monkeypatch.setattr(queries, "COUNT_CAP", 3)
    rows, total = _page(five, [], ("", []), "new", 2, 0)
    assert len(rows) == 2 and total == 4  # "more than 3": the cap plus one
    monkeypatch.setattr(queries, "COUNT_CAP", 10)
    assert _page(five, [], ("", []), "new", 2, 0)[1] == 5


def test_a_page_that_is_not_full_needs_no_count(five):
    counted: list[str] = []
    rows, total = _page(five, [], ("", []), "new", 2, 4, counted=counted)
    assert (len(rows), total, counted) == (1, 5, [])  # the last page: offset + its rows
    rows, total = _page(five, [], ("", []), "new", 10, 0, counted=counted)
    assert (len(rows), total, counted) == (5, 5, [])
    _page(five, [], ("", []), "new", 2, 0, counted=counted)
    assert len(counted) == 1  # a full page: more may follow, so they are counted


@pytest.mark.parametrize(
    "filters",
    [[("rank", "2")], [("rank", "4")], [("target", "q_proj")], [("target", "o_proj")]],
)
@pytest.mark.parametrize("sort", sorted(queries.SORTS))
def test_filters_and_sorts_agree_with_reading_every_adapter(five, filters, sort):
    everything = five.list_adapters()
    key, value = filters[0]
    if key == "rank":
        want = [i for i in everything if int(value) in i.ranks]
    else:
        want = [i for i in everything if value in i.targets]
    rows, total = _page(five, reads.parse_filters(dict(filters)), ("", []), sort, 100, 0)
    assert total == len(want) and {i.digest for i in rows} == {i.digest for i in want}
    order = {
        "new": lambda i: i.created_at,
        "old": lambda i: i.created_at,
        "rank": lambda i: i.rank,
        "size": lambda i: i.size,
    }[sort]
    got = [order(i) for i in rows]
    assert got == sorted(got, reverse=sort != "old")
