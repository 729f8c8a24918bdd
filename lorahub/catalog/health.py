"""Catalog reads for the store's upkeep (gc, verify, fsck): whole-table scans that do not
trust an index alone, and the database's own integrity check."""

from __future__ import annotations

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from .models import Adapter, Blob, Ref


def adapters_using(session: Session, weights_digest: str) -> list[Adapter]:
    """Adapters whose weights are the blob ``weights_digest``."""
    return list(session.scalars(select(Adapter).where(Adapter.weights_digest == weights_digest)))


def adapter_rows(session: Session) -> list[tuple[str, str, str]]:
    """``(digest, weights_digest, manifest)`` of every adapter, by a scan of the table."""
    rows = session.execute(select(Adapter.digest, Adapter.weights_digest, Adapter.manifest))
    return [(d, w, m) for d, w, m in rows]


def adapter_digests(session: Session) -> set[str]:
    return set(session.scalars(select(Adapter.digest)))


def blob_rows(session: Session) -> dict[str, int]:
    return {d: size for d, size in session.execute(select(Blob.digest, Blob.size))}


def refs_of(session: Session) -> set[tuple[str, str]]:
    """Every ``(name, tag)`` that points somewhere."""
    return {(n, t) for n, t in session.execute(select(Ref.name, Ref.tag))}


def integrity_problems(engine: Engine, *, quick: bool = False) -> list[str]:
    """What the database itself reports as damaged (SQLite's ``quick_check`` or
    ``integrity_check``; an index that disagrees with its table is one). Empty when sound
    or when the database has no such check."""
    if engine.dialect.name != "sqlite":
        return []
    from sqlalchemy.exc import DBAPIError

    pragma = "quick_check" if quick else "integrity_check"
    try:
        with engine.connect() as conn:
            lines = [r[0] for r in conn.execute(text(f"PRAGMA {pragma}"))]
    except DBAPIError as exc:  # too damaged to check: that is the answer
        return [str(exc.orig or exc).splitlines()[0]]
    return [] if lines == ["ok"] else lines
