"""Catalog reads and writes, each on a session the caller owns (so callers decide what is
one transaction)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, selectinload

from ..adapter import LoraAdapter
from ..digest import PREFIX, prefix_range
from ..info import AdapterInfo
from ..manifest import BaseRef
from ..refs import Reference, format_ref
from . import reads
from .models import Adapter, AdapterModule, BaseModelRow, Blob, Ref

if TYPE_CHECKING:
    from sqlalchemy import CursorResult


def utcnow() -> datetime:
    """Now, timezone-aware in UTC (what the catalog's ``UTCDateTime`` columns hold)."""
    return datetime.now(timezone.utc)


def ensure_blob(session: Session, digest: str, size: int) -> None:
    if session.get(Blob, digest) is None:
        session.add(Blob(digest=digest, size=size, created_at=utcnow()))
        session.flush()


def adapter_by_digest(session: Session, digest: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.digest == digest))


def insert_adapter(
    session: Session,
    *,
    digest: str,
    manifest_text: str,
    adapter: LoraAdapter,
    weights_digest: str,
    size: int,
    base: BaseRef,
    base_id: int | None,
    origin_kind: str,
    origin: Mapping[str, Any],
) -> Adapter:
    row = Adapter(
        digest=digest,
        manifest=manifest_text,
        weights_digest=weights_digest,
        size=size,
        rank=adapter.rank,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora,
        targets=",".join(adapter.targets),
        module_count=len(adapter.modules),
        base_name=base.name,
        base_revision=base.revision,
        base_signature=base.signature,
        base_content_hash=base.content_hash,
        base_id=base_id,
        origin_kind=origin_kind,
        origin=json.dumps(dict(origin), sort_keys=True),
        created_at=utcnow(),
    )
    row.modules = [
        AdapterModule(
            module=name,
            leaf=name.rsplit(".", 1)[-1],
            kind=m.kind,
            in_features=m.in_features,
            out_features=m.out_features,
            rank=m.rank,
            alpha=m.alpha,
        )
        for name, m in adapter.modules.items()
    ]
    session.add(row)
    session.flush()
    return row


def set_ref(session: Session, name: str, tag: str, row: Adapter) -> None:
    """Point ``name:tag`` at ``row``.

    Only adapters recorded against a verified base are variants: the tag keeps one per base
    content, like a multi-platform image (Llama-3.2-1B and its Instruct model share a
    signature but not their content, so each keeps its own). Otherwise it is a plain tag
    move: an adapter with an unverified base replaces every variant, and any adapter replaces
    an unverified one, so a new version never hides behind the old one it was meant to replace.
    A base known only by its signature (a composition of adapters for several bases of one
    architecture) is for every base of that architecture: it takes the place of each variant
    with that signature, and any of them takes its place, so one base never has two variants.
    """
    base = base_of(row)
    for ref in session.scalars(select(Ref).where(Ref.name == name, Ref.tag == tag)).all():
        # The variant check also keeps the (name, tag, variant) key free for the new row.
        if _same_slot(base, base_of(ref.adapter)) or ref.variant == base.variant:
            session.delete(ref)
    session.flush()
    session.add(
        Ref(name=name, tag=tag, variant=base.variant, adapter_id=row.id, created_at=utcnow())
    )
    session.flush()


def _same_slot(new: BaseRef, old: BaseRef) -> bool:
    """Whether ``new`` replaces ``old`` under one ``name:tag`` (see :func:`set_ref`)."""
    if not new.verified or not old.verified:
        return True
    if new.signature != old.signature:
        return False
    return (
        new.content_hash is None or old.content_hash is None or new.content_hash == old.content_hash
    )


def base_of(row: Adapter) -> BaseRef:
    return BaseRef(row.base_name, row.base_revision, row.base_signature, row.base_content_hash)


def candidates(session: Session, ref: Reference) -> list[Adapter]:
    """Adapters a reference may mean: name first (all base variants), then digest prefix."""
    if ref.name is not None:
        rows = list(
            session.scalars(
                select(Adapter)
                .join(Ref, Ref.adapter_id == Adapter.id)
                .where(Ref.name == ref.name, Ref.tag == ref.tag)
                .options(selectinload(Adapter.refs))
            ).unique()
        )
        if rows or ref.prefix is None:
            return rows
    assert ref.prefix is not None
    if len(ref.prefix) == 32:
        row = adapter_by_digest(session, PREFIX + ref.prefix)
        return [row] if row else []
    lo, hi = prefix_range(ref.prefix)
    return list(
        session.scalars(
            select(Adapter)
            .where(Adapter.digest >= lo, Adapter.digest < hi)
            .limit(20)
            .options(selectinload(Adapter.refs))
        )
    )


def resolve_one(session: Session, ref: Reference) -> Adapter:
    """The single adapter a reference names; errors list what it could mean."""
    rows = candidates(session, ref)
    if len(rows) != 1:
        found = [(r.digest, base_of(r)) for r in rows]
        reads.not_one(runner(session), ref, ref.name is not None, found)
    return rows[0]


# --- the reads behind ls, show and resolve live in .reads, in plain SQL; these run them
# on a session's connection (any database SQLAlchemy speaks).

parse_filters = reads.parse_filters
FILTER_KEYS = reads.FILTER_KEYS


def runner(session: Session) -> reads.Run:
    """A :data:`reads.Run` over the session's connection, in the driver's own style."""
    conn = session.connection()
    style = conn.dialect.paramstyle

    def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if style in ("format", "pyformat"):
            sql = sql.replace("%", "%%").replace("?", "%s")
        return [tuple(r) for r in conn.exec_driver_sql(sql, tuple(params)).all()]

    return run


def list_infos(
    session: Session, filters: Sequence[tuple[str, str]] = (), limit: int | None = None
) -> list[AdapterInfo]:
    return reads.list_infos(runner(session), filters, limit)


def candidate_infos(session: Session, ref: Reference) -> tuple[list[AdapterInfo], bool]:
    return reads.candidate_infos(runner(session), ref)


def resolve_info(session: Session, ref: Reference) -> AdapterInfo:
    return reads.resolve_info(runner(session), ref)


def to_info(row: Adapter) -> AdapterInfo:
    return AdapterInfo(
        digest=row.digest,
        refs=tuple(sorted({format_ref(r.name, r.tag) for r in row.refs})),
        rank=row.rank,
        alpha=row.alpha,
        use_rslora=row.use_rslora,
        use_dora=row.use_dora,
        targets=tuple(t for t in row.targets.split(",") if t),
        module_count=row.module_count,
        size=row.size,
        weights_digest=row.weights_digest,
        base=base_of(row),
        origin_kind=row.origin_kind,
        origin_text=row.origin,
        created_at=row.created_at,
        manifest_text=row.manifest,
        rank_counts=rank_counts(row),
    )


def rank_counts(row: Adapter) -> tuple[tuple[int, int], ...]:
    """``(rank, modules)`` pairs when the adapter's modules have several ranks, else ()."""
    counts = Counter(m.rank for m in row.modules)
    return tuple(sorted(counts.items())) if len(counts) > 1 else ()


def remove_ref(session: Session, name: str, tag: str, adapter_id: int | None = None) -> int:
    stmt = delete(Ref).where(Ref.name == name, Ref.tag == tag)
    if adapter_id is not None:
        stmt = stmt.where(Ref.adapter_id == adapter_id)
    result = cast("CursorResult[Any]", session.execute(stmt))  # a DELETE's result has a cursor
    return result.rowcount or 0


def delete_adapter(session: Session, row: Adapter) -> None:
    session.delete(row)
    session.flush()


def ref_count(session: Session, adapter_id: int) -> int:
    return (
        session.scalar(select(func.count()).select_from(Ref).where(Ref.adapter_id == adapter_id))
        or 0
    )


def referenced_weights(session: Session) -> set[str]:
    return set(session.scalars(select(Adapter.weights_digest).distinct()))


# --- whole-table reads for gc, verify and fsck: scans that do not trust an index alone,
# in the table's own order unless asked (fsck's reports list what it found in that order).


def adapters_using(session: Session, weights_digest: str) -> list[Adapter]:
    """Adapters whose weights are the blob ``weights_digest``."""
    return list(session.scalars(select(Adapter).where(Adapter.weights_digest == weights_digest)))


def adapter_rows(session: Session) -> list[tuple[str, str, str]]:
    """``(digest, weights_digest, manifest)`` of every adapter, by a scan of the table."""
    rows = session.execute(select(Adapter.digest, Adapter.weights_digest, Adapter.manifest))
    return [(d, w, m) for d, w, m in rows]


def adapter_digests(session: Session) -> set[str]:
    return set(session.scalars(select(Adapter.digest)))


def adapter_origins(session: Session) -> list[tuple[str, str, str, str]]:
    """``(digest, weights_digest, origin_kind, origin JSON)`` of every adapter."""
    rows = session.execute(
        select(Adapter.digest, Adapter.weights_digest, Adapter.origin_kind, Adapter.origin)
    )
    return [(d, w, k, o) for d, w, k, o in rows]


def all_adapters(session: Session, *, oldest_first: bool = False) -> list[Adapter]:
    """Every adapter row; ``oldest_first`` in the order they were added."""
    stmt = select(Adapter)
    if oldest_first:
        stmt = stmt.order_by(Adapter.created_at, Adapter.id)
    return list(session.scalars(stmt))


def all_refs(session: Session, *, oldest_first: bool = False) -> list[Ref]:
    """Every name row; ``oldest_first`` in the order they were set."""
    stmt = select(Ref)
    if oldest_first:
        stmt = stmt.order_by(Ref.created_at, Ref.id)
    return list(session.scalars(stmt))


def all_bases(session: Session) -> list[BaseModelRow]:
    return list(session.scalars(select(BaseModelRow)))


def blob_rows(session: Session) -> dict[str, int]:
    """``{digest: size}`` of every blob row."""
    return {d: size for d, size in session.execute(select(Blob.digest, Blob.size))}


def drop_blob_rows(session: Session, digests: Iterable[str]) -> None:
    """Forget these blobs (rows that are not there are skipped)."""
    for digest in digests:
        row = session.get(Blob, digest)
        if row is not None:
            session.delete(row)
