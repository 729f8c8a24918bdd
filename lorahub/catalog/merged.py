"""Catalog rows for merged checkpoints made on demand, with least-recently-used eviction."""

from __future__ import annotations

import json

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..digest import prefix_range
from ..info import MergedInfo
from .models import MergedEntry
from .queries import utcnow


def to_info(row: MergedEntry) -> MergedInfo:
    return MergedInfo(
        key=row.key,
        path=row.path,
        size=row.size,
        base_name=row.base_name,
        base_content_hash=row.base_content_hash,
        adapters=tuple((d, float(w)) for d, w in json.loads(row.adapters)),
        dtype=row.dtype,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


def get(session: Session, key: str) -> MergedEntry | None:
    return session.scalar(select(MergedEntry).where(MergedEntry.key == key))


def touch(row: MergedEntry) -> None:
    row.last_used_at = utcnow()


def insert(session: Session, info: MergedInfo) -> MergedEntry:
    now = utcnow()
    row = MergedEntry(
        key=info.key,
        path=info.path,
        size=info.size,
        base_content_hash=info.base_content_hash,
        base_name=info.base_name,
        adapters=json.dumps([list(a) for a in info.adapters]),
        dtype=info.dtype,
        created_at=now,
        last_used_at=now,
    )
    session.add(row)
    session.flush()
    return row


def all_rows(session: Session) -> list[MergedEntry]:
    return list(session.scalars(select(MergedEntry).order_by(MergedEntry.last_used_at.desc())))


def find(session: Session, prefix: str) -> list[MergedEntry]:
    lo, hi = prefix_range(prefix)
    return list(
        session.scalars(select(MergedEntry).where(MergedEntry.key >= lo, MergedEntry.key < hi))
    )


def over_cap(session: Session, cap: int, keep: str) -> list[MergedEntry]:
    """Least recently used entries to evict so the total fits ``cap`` (never ``keep``)."""
    total = session.scalar(select(func.coalesce(func.sum(MergedEntry.size), 0))) or 0
    victims = []
    for row in session.scalars(select(MergedEntry).order_by(MergedEntry.last_used_at)):
        if total <= cap:
            break
        if row.key == keep:
            continue
        victims.append(row)
        total -= row.size
    return victims
