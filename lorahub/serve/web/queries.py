"""The catalog reads behind the web pages, in plain SQL on a :data:`reads.Run`.

Every listing is one page of rows (``LIMIT``/``OFFSET`` on an indexed order): a store of
100,000 adapters is never read whole in Python. The filters are the ones ``lorahub ls``
takes (:func:`lorahub.catalog.reads.parse_filters`), so a page and ``ls --filter`` agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...catalog import reads
from ...info import AdapterInfo

#: Sort keys a page may ask for, and the ORDER BY each means (``id`` breaks ties).
SORTS = {
    "new": "a.created_at DESC, a.id DESC",
    "old": "a.created_at ASC, a.id ASC",
    "rank": "a.rank DESC, a.created_at DESC, a.id DESC",  # walks ix_adapters_rank_created_at
    "size": "a.size DESC, a.id DESC",
}


#: Matches counted for a listing; beyond, the page says "more than" and pages on. Counting
#: stops here because a broad filter's every match costs as much to count as to read
#: (1,000: about 5 ms at 100,000 adapters; 10,000 took 40).
COUNT_CAP = 1_000


@dataclass(frozen=True)
class Totals:
    """What the home page counts: adapters, blobs and their bytes, what deduplication saved
    (weights that several adapters share are stored once), and the merged cache."""

    adapters: int
    blobs: int
    blob_bytes: int
    saved_bytes: int
    merged: int
    merged_bytes: int


def readable(namespaces: frozenset[str] | None, default: str) -> tuple[str, list[Any]]:
    """A condition on ``a`` keeping the adapters a caller limited to ``namespaces`` may see:
    one of its names is in one of them (a name without ``/`` is in ``default``). An adapter
    with no name at all belongs to ``default``. None: every namespace, no condition."""
    if namespaces is None:
        return "", []
    conds: list[str] = []
    params: list[Any] = []
    for ns in sorted(namespaces):
        conds.append("r.name LIKE ? ESCAPE '\\'")
        params.append(_like_escape(ns) + "/%")
        if ns == default:
            conds.append("r.name NOT LIKE '%/%'")
    named = " OR ".join(conds) or "1 = 0"
    sql = f"a.id IN (SELECT r.adapter_id FROM refs r WHERE {named})"
    if default in namespaces:
        sql = f"({sql} OR NOT EXISTS (SELECT 1 FROM refs r2 WHERE r2.adapter_id = a.id))"
    return sql, params


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _where(
    filters: Sequence[tuple[str, str]], extra: tuple[str, list[Any]]
) -> tuple[str, list[Any]]:
    where, params = reads.where_clause(filters)
    if extra[0]:
        where = f"{where} AND {extra[0]}" if where else f" WHERE {extra[0]}"
        params = [*params, *extra[1]]
    return where, params


def page(
    run: reads.Run,
    filters: Sequence[tuple[str, str]],
    access: tuple[str, list[Any]],
    sort: str,
    limit: int,
    offset: int,
) -> tuple[list[AdapterInfo], int]:
    """One page of adapters matching ``filters`` in ``sort`` order, and how many match, up
    to :data:`COUNT_CAP` (more than that: ``COUNT_CAP + 1``).

    A first page that is not full is the whole answer: no count is run. Otherwise the count
    stops at the cap: counting every match of a broad filter costs as much as reading them.
    """
    where, params = _where(filters, access)
    order = SORTS.get(sort, SORTS["new"])
    rows = run(
        f"SELECT {reads.INFO_COLUMNS} FROM adapters a{where} ORDER BY {order} "
        f"LIMIT {int(limit)} OFFSET {int(offset)}",
        params,
    )
    infos = reads.infos_from_rows(run, rows)
    by_digest = {i.digest: i for i in infos}  # infos_from_rows keeps order; be explicit
    ordered = [by_digest[row[1]] for row in rows if row[1] in by_digest]
    if 0 < len(rows) < limit or (offset == 0 and not rows):
        return ordered, offset + len(rows)
    # In the page's own order: the planner then walks the index the page walked, where
    # matches lie as densely as on the page, and stops at the cap. Left to itself, it may
    # pick an index that holds every non-match first (ranks in order: tens of ms).
    (count,) = run(
        f"SELECT COUNT(*) FROM (SELECT 1 FROM adapters a{where} ORDER BY {order} "
        f"LIMIT {COUNT_CAP + 1}) t",
        params,
    )[0]
    return ordered, int(count)


def totals(run: reads.Run) -> Totals:
    """The store's totals, in four aggregate queries."""
    (adapters, adapter_bytes) = run("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM adapters", [])[0]
    (blobs, blob_bytes) = run("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs", [])[0]
    (used,) = run(
        "SELECT COALESCE(SUM(b.size), 0) FROM blobs b "
        "WHERE b.digest IN (SELECT a.weights_digest FROM adapters a)",
        [],
    )[0]
    (merged, merged_bytes) = run("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM merged", [])[0]
    return Totals(
        int(adapters),
        int(blobs),
        int(blob_bytes),
        max(0, int(adapter_bytes) - int(used)),
        int(merged),
        int(merged_bytes),
    )


def by_digest(run: reads.Run, digest: str) -> AdapterInfo | None:
    rows = run(f"SELECT {reads.INFO_COLUMNS} FROM adapters a WHERE a.digest = ?", [digest])
    infos = reads.infos_from_rows(run, rows)
    return infos[0] if infos else None


def children(run: reads.Run, digest: str, limit: int = 50) -> list[AdapterInfo]:
    """Adapters composed from ``digest``. The parents are only in the manifest's
    provenance, so this is a substring search on composed adapters' manifests (an index on
    ``origin_kind`` narrows it), checked against the parsed provenance."""
    rows = run(
        f"SELECT {reads.INFO_COLUMNS} FROM adapters a WHERE a.origin_kind = 'compose' "
        "AND a.manifest LIKE ? ORDER BY a.created_at DESC LIMIT ?",
        [f'%"{digest}"%', int(limit)],
    )
    return [
        i for i in reads.infos_from_rows(run, rows) if digest in i.provenance.get("parents", ())
    ]


def fitting(
    run: reads.Run, signature: str, access: tuple[str, list[Any]], limit: int = 100
) -> list[AdapterInfo]:
    """Adapters recorded for a base of this signature (its architecture and shapes), newest
    first: the ones that fit it, exactly or by shape."""
    where, params = _where([], access)
    cond = "a.base_signature = ?"
    where = f"{where} AND {cond}" if where else f" WHERE {cond}"
    rows = run(
        f"SELECT {reads.INFO_COLUMNS} FROM adapters a{where} ORDER BY a.created_at DESC, a.id DESC "
        f"LIMIT {int(limit)}",
        [*params, signature],
    )
    return reads.infos_from_rows(run, rows)


def merged_of(run: reads.Run, digest: str) -> list[dict[str, Any]]:
    """The merged checkpoints kept for this adapter (alone or with others)."""
    rows = run(
        "SELECT key, base_name, adapters, dtype, size FROM merged WHERE adapters LIKE ? "
        "ORDER BY last_used_at DESC LIMIT 50",
        [f'%"{digest}"%'],
    )
    out = []
    for key, base_name, adapters, dtype, size in rows:
        pairs = json.loads(adapters)
        if any(d == digest for d, _ in pairs):
            out.append(
                {"key": key, "base": base_name, "adapters": pairs, "dtype": dtype, "size": size}
            )
    return out
