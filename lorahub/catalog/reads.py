"""The catalog reads that answer ``ls``, ``show``, ``resolve`` and ``check``, in plain SQL.

They run on any DB-API connection: the standard library's ``sqlite3`` for the embedded
store (``import sqlalchemy`` alone takes longer than these commands' whole budget, so a
command that only reads does not pay for it), or a SQLAlchemy connection for any other
database (:func:`lorahub.catalog.queries.runner`). Parameters are written ``?``; a runner
for a driver with another style translates them. Nothing here imports SQLAlchemy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from ..digest import PREFIX, hex_prefix, prefix_range, short
from ..errors import AdapterNotFound, AmbiguousReference, InvalidReference
from ..info import AdapterInfo, BaseInfo
from ..manifest import BaseRef
from ..refs import MIN_PREFIX, Reference, format_ref

# Runs one statement with its parameters and returns every row.
Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

FILTER_KEYS = ("rank", "alpha", "target", "module", "base", "dora", "rslora", "origin", "name")
_TRUE, _FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")
_IN_BATCH = 500  # ids per IN (...): well under every SQLite build's variable limit
_RANK_PATTERN = '"rank_pattern":{"'  # a non-empty rank_pattern, in canonical JSON
_SHOWN_TAGS = 10  # tags a "no adapter matches" error lists, at most
INFO_COLUMNS = (
    "a.id, a.digest, a.manifest, a.weights_digest, a.size, a.rank, a.alpha, a.use_rslora, "
    "a.use_dora, a.targets, a.module_count, a.base_name, a.base_revision, a.base_signature, "
    "a.base_content_hash, a.origin_kind, a.origin, a.created_at"
)
_BASE = (
    "id, name, path, repo_id, revision, signature, content_hash, tensor_count, total_bytes, "
    "created_at"
)


# ------------------------------------------------------------------------- filters


def parse_filters(filters: Iterable[str] | Mapping[str, str]) -> list[tuple[str, str]]:
    """``["rank=16", "target=q_proj"]`` (or a mapping) as checked ``(key, value)`` pairs."""
    items = filters.items() if isinstance(filters, Mapping) else (_split(f) for f in filters)
    out = []
    for key, value in items:
        if key not in FILTER_KEYS:
            raise InvalidReference(f"unknown filter {key!r}; use one of: {', '.join(FILTER_KEYS)}")
        if key in ("rank", "alpha"):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if (
                not math.isfinite(number)
                or abs(number) >= 2**63
                or (key == "rank" and not number.is_integer())
            ):
                kind = "a whole number" if key == "rank" else "a finite number"
                raise InvalidReference(f"filter {key} needs {kind}, got {value!r}")
        if key in ("dora", "rslora") and value.lower() not in _TRUE + _FALSE:
            raise InvalidReference(f"filter {key} needs true or false, got {value!r}")
        out.append((key, value))
    return out


def _split(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise InvalidReference(f"filter {text!r} must look like key=value (e.g. rank=16)")
    return key.strip(), value.strip()


def is_true(value: str) -> bool:
    return value.lower() in _TRUE


def where_clause(filters: Sequence[tuple[str, str]]) -> tuple[str, list[Any]]:
    """The WHERE clause (``a`` is the adapters table) and its parameters."""
    conds: list[str] = []
    params: list[Any] = []
    for key, value in filters:
        if key == "rank":  # the config's r, or any module's own (a rank_pattern)
            # A correlated EXISTS, not IN (a union of two index lookups): a listing with a
            # LIMIT walks an index in its order and stops at its rows, where IN first
            # gathers every match (a tenth of a second at 100,000 adapters).
            conds.append(
                "(a.rank = ? OR EXISTS (SELECT 1 FROM adapter_modules m "
                "WHERE m.adapter_id = a.id AND m.rank = ?))"
            )
            params += [int(float(value))] * 2
        elif key == "alpha":
            conds.append("a.alpha = ?")
            params.append(float(value))
        elif key in ("target", "module"):
            col = "leaf" if key == "target" else "module"
            conds.append(
                f"EXISTS (SELECT 1 FROM adapter_modules m WHERE m.adapter_id = a.id "
                f"AND m.{col} = ?)"
            )
            params.append(value)
        elif key == "base":
            conds.append("(a.base_name = ? OR a.base_signature = ? OR a.base_content_hash = ?)")
            params += [value, value, value]
        elif key in ("dora", "rslora"):
            conds.append(f"a.use_{key} = ?")
            params.append(is_true(value))
        elif key == "origin":
            conds.append("a.origin_kind = ?")
            params.append(value)
        elif key == "name":
            # IN, not a correlated EXISTS: the refs (name, ...) index finds the few rows;
            # EXISTS made SQLite test every adapter (`lorahub serve` asks this per request).
            conds.append("a.id IN (SELECT r.adapter_id FROM refs r WHERE r.name = ?)")
            params.append(value)
    return (" WHERE " + " AND ".join(conds)) if conds else "", params


# ------------------------------------------------------------------------- adapters


def list_infos(
    run: Run, filters: Sequence[tuple[str, str]] = (), limit: int | None = None
) -> list[AdapterInfo]:
    """Adapters matching ``filters``, newest first, manifests left unparsed."""
    where, params = where_clause(filters)
    sql = f"SELECT {INFO_COLUMNS} FROM adapters a{where} ORDER BY a.created_at DESC, a.id DESC"
    if limit:
        sql += f" LIMIT {int(limit)}"
    return infos_from_rows(run, run(sql, params))


def candidate_infos(run: Run, ref: Reference) -> tuple[list[AdapterInfo], bool]:
    """The adapters a reference may mean, and whether they were found by name (so several
    are base variants of one ``name:tag``, not a prefix of several digests)."""
    if ref.name is not None:
        rows = run(
            f"SELECT {INFO_COLUMNS} FROM adapters a JOIN refs r ON r.adapter_id = a.id "
            "WHERE r.name = ? AND r.tag = ? ORDER BY r.variant, a.id",
            [ref.name, ref.tag],
        )
        if rows or ref.prefix is None:
            return infos_from_rows(run, rows), True
    assert ref.prefix is not None
    if len(ref.prefix) == 32:
        full = PREFIX + ref.prefix
        return infos_from_rows(
            run, run(f"SELECT {INFO_COLUMNS} FROM adapters a WHERE a.digest = ?", [full])
        ), False
    rows = run(
        f"SELECT {INFO_COLUMNS} FROM adapters a WHERE a.digest >= ? AND a.digest < ? LIMIT 20",
        list(prefix_range(ref.prefix)),
    )
    return infos_from_rows(run, rows), False


def resolve_info(run: Run, ref: Reference) -> AdapterInfo:
    """The single adapter a reference names; errors list what it could mean."""
    infos, by_name = candidate_infos(run, ref)
    if len(infos) != 1:
        not_one(run, ref, by_name, [(i.digest, i.base) for i in infos])
    return infos[0]


def tags_of(run: Run, name: str) -> list[str]:
    """Every tag stored under ``name``, the most recently set first (once each, however
    many base variants it has)."""
    rows = run(
        "SELECT tag FROM refs WHERE name = ? GROUP BY tag ORDER BY MAX(created_at) DESC, tag",
        [name],
    )
    return [tag for (tag,) in rows]


def not_found(run: Run, ref: Reference) -> AdapterNotFound:
    """The error for a reference that matched nothing: for a name whose other tags exist,
    it lists them (and says a bare name means ``:latest``), so the next try is obvious."""
    tags = tags_of(run, ref.name) if ref.name is not None else []
    if not tags:
        return AdapterNotFound(ref.text)
    bare = ":" not in ref.text
    shown = ", ".join(format_ref(ref.name or "", t) for t in tags[:_SHOWN_TAGS])
    more = f" and {len(tags) - _SHOWN_TAGS} more" if len(tags) > _SHOWN_TAGS else ""
    means = f" (a bare name means {format_ref(ref.name or '', ref.tag)!r})" if bare else ""
    return AdapterNotFound(
        ref.text,
        f"no adapter matches {ref.text!r}{means}; {ref.name} has tag(s): {shown}{more}. "
        f"Name one, e.g. `{format_ref(ref.name or '', tags[0])}`, or see `lorahub ls "
        f"--filter name={ref.name}`",
    )


def not_one(run: Run, ref: Reference, by_name: bool, found: Sequence[tuple[str, BaseRef]]) -> None:
    """Raise for a reference that matched nothing (listing the name's other tags), or
    several ``(digest, base)``: by name, they are variants of one ``name:tag``; else a
    prefix of several digests."""
    if not found:
        raise not_found(run, ref)
    if by_name:
        lines = [f"{short(d)}  for base {b.name or b.variant or '?'}" for d, b in found]
        raise AmbiguousReference(
            ref.text,
            lines,
            hint="it has one variant per base model: name one by digest (@<digest>), or "
            "pick it for a base (`lorahub resolve NAME --base BASE`; show, export, push "
            "and rm take --base too)",
        )
    raise AmbiguousReference(ref.text, [d for d, _ in found])


def infos_from_rows(run: Run, rows: list[tuple[Any, ...]]) -> list[AdapterInfo]:
    rows = list({row[0]: row for row in rows}.values())
    refs = _refs_of(run, [row[0] for row in rows])
    # Only a manifest whose config spells out a rank_pattern (manifest.explicit_patterns
    # writes one whenever a module's rank is not r) can have modules of other ranks; a
    # substring test on canonical JSON may say yes wrongly (a nested key), never no.
    mixed = _rank_counts(run, [row[0] for row in rows if _RANK_PATTERN in row[2]])
    return [_info(row, refs.get(row[0], ()), mixed.get(row[0], ())) for row in rows]


def _rank_counts(run: Run, ids: Sequence[int]) -> dict[int, tuple[tuple[int, int], ...]]:
    """``(rank, modules)`` pairs of each adapter id whose modules have several ranks."""
    counts: dict[int, list[tuple[int, int]]] = {}
    for chunk in (ids[i : i + _IN_BATCH] for i in range(0, len(ids), _IN_BATCH)):
        rows = run(
            # m.rank qualified: RANK is a reserved word in MySQL, except after a period
            "SELECT m.adapter_id, m.rank, COUNT(*) FROM adapter_modules m WHERE m.adapter_id "
            f"IN ({', '.join('?' * len(chunk))}) GROUP BY m.adapter_id, m.rank",
            list(chunk),
        )
        for adapter_id, rank, n in rows:
            counts.setdefault(adapter_id, []).append((int(rank), int(n)))
    return {k: tuple(sorted(v)) for k, v in counts.items() if len(v) > 1}


def _refs_of(run: Run, ids: Sequence[int]) -> dict[int, list[str]]:
    """``name:tag`` of each adapter id, in one query or a few."""
    out: dict[int, list[str]] = {}
    if len(ids) > 4 * _IN_BATCH:  # most of the catalog: reading every ref beats many INs
        wanted: set[int] | None = set(ids)
        batches = [run("SELECT adapter_id, name, tag FROM refs", [])]
    else:
        wanted = None
        batches = [
            run(
                "SELECT adapter_id, name, tag FROM refs WHERE adapter_id IN "
                f"({', '.join('?' * len(chunk))})",
                list(chunk),
            )
            for chunk in (ids[i : i + _IN_BATCH] for i in range(0, len(ids), _IN_BATCH))
        ]
    for rows in batches:
        for adapter_id, name, tag in rows:
            if wanted is None or adapter_id in wanted:
                out.setdefault(adapter_id, []).append(format_ref(name, tag))
    return out


def _info(
    row: Sequence[Any], refs: Iterable[str], rank_counts: tuple[tuple[int, int], ...] = ()
) -> AdapterInfo:
    """An info from a row of ``INFO_COLUMNS`` (unpacked by position: by name costs more than the
    rest of the work when there are 100,000 rows)."""
    (
        _id,
        digest,
        manifest,
        weights_digest,
        size,
        rank,
        alpha,
        use_rslora,
        use_dora,
        targets,
        module_count,
        base_name,
        base_revision,
        base_signature,
        base_content_hash,
        origin_kind,
        origin,
        created_at,
    ) = row
    return AdapterInfo(
        digest=digest,
        refs=tuple(sorted(set(refs))),
        rank=rank,
        alpha=alpha,
        use_rslora=bool(use_rslora),
        use_dora=bool(use_dora),
        targets=tuple(t for t in targets.split(",") if t),
        module_count=module_count,
        size=size,
        weights_digest=weights_digest,
        base=BaseRef(base_name, base_revision, base_signature, base_content_hash),
        origin_kind=origin_kind,
        origin_text=origin,
        created_at=_datetime(created_at),
        manifest_text=manifest,
        rank_counts=rank_counts,
    )


def _datetime(value: Any) -> datetime:
    """An aware UTC datetime, as the ORM's ``UTCDateTime`` reads it: SQLite keeps ISO text
    (with ``+00:00`` since revision 0002), other databases return datetimes (naive ones,
    as MySQL's, hold UTC)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


# ------------------------------------------------------------------------- bases


def find_bases(run: Run, text: str) -> list[BaseInfo]:
    """Bases recorded under a name, repo id, path, or fingerprint (full or 12+ hex prefix),
    oldest first."""
    conds = ["name = ?", "repo_id = ?", "path = ?"]
    params: list[Any] = [text, text, text]
    hexpart = hex_prefix(text, MIN_PREFIX)
    if hexpart is not None:
        for col in ("signature", "content_hash"):
            conds.append(f"({col} >= ? AND {col} < ?)")
            params += prefix_range(hexpart)
    rows = run(f"SELECT {_BASE} FROM base_models WHERE {' OR '.join(conds)} ORDER BY id", params)
    return [_base(row) for row in rows]


def tensor_table(run: Run, ident: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of every tensor of the base with id ``ident``."""
    rows = run("SELECT tensor_table FROM base_models WHERE id = ?", [ident])
    return [(n, d, tuple(s)) for n, d, s in json.loads(rows[0][0])] if rows else []


def _base(row: Sequence[Any]) -> BaseInfo:
    ident, name, path, repo_id, revision, signature, content_hash, count, size, created = row
    return BaseInfo(
        id=ident,
        name=name,
        path=path,
        repo_id=repo_id,
        revision=revision,
        signature=signature,
        content_hash=content_hash,
        tensor_count=count,
        total_bytes=size,
        created_at=_datetime(created),
    )
