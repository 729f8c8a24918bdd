"""Catalog rows for base models: their fingerprints and tensor tables, so checks need no
access to the base's files once it has been seen."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from ..digest import hex_prefix, prefix_range
from ..info import BaseInfo
from ..refs import MIN_PREFIX
from .models import BaseModelRow
from .queries import utcnow

if TYPE_CHECKING:
    from ..base import BaseModel, TensorInfo


def to_info(row: BaseModelRow) -> BaseInfo:
    return BaseInfo(
        id=row.id,
        name=row.name,
        path=row.path,
        repo_id=row.repo_id,
        revision=row.revision,
        signature=row.signature,
        content_hash=row.content_hash,
        tensor_count=row.tensor_count,
        total_bytes=row.total_bytes,
        created_at=row.created_at,
    )


def tensor_table(row: BaseModelRow) -> dict[str, TensorInfo]:
    from ..base import TensorInfo

    return {n: TensorInfo(n, d, tuple(s)) for n, d, s in json.loads(row.tensor_table)}


def upsert(
    session: Session, model: BaseModel, name: str, content_hash: str | None, rename: bool = False
) -> BaseModelRow:
    """The row for this base, matched by content (or, unhashed, by signature and place)."""
    signature = str(model.signature)
    path = str(model.root) if model.root is not None and not model.repo_id else None
    q = select(BaseModelRow).where(BaseModelRow.signature == signature)
    if content_hash:
        q = q.where(BaseModelRow.content_hash == content_hash)
    else:
        q = q.where(
            BaseModelRow.content_hash.is_(None),
            BaseModelRow.path.is_(path) if path is None else BaseModelRow.path == path,
            BaseModelRow.repo_id.is_(model.repo_id)
            if model.repo_id is None
            else BaseModelRow.repo_id == model.repo_id,
        )
    row = session.scalars(q.order_by(BaseModelRow.id)).first()
    if row is None:
        table = sorted([t.name, t.dtype, list(t.shape)] for t in model.tensors.values())
        row = BaseModelRow(
            name=name,
            path=path,
            repo_id=model.repo_id,
            revision=model.revision,
            signature=signature,
            content_hash=content_hash,
            tensor_count=len(model.tensors),
            total_bytes=model.total_bytes,
            tensor_table=json.dumps(table, separators=(",", ":")),
            created_at=utcnow(),
        )
        session.add(row)
    else:
        if rename:  # only a name the user gave replaces the one recorded
            row.name = name
        row.path = path or row.path
        row.revision = model.revision or row.revision
    session.flush()
    return row


def find(session: Session, text: str) -> list[BaseModelRow]:
    """Bases recorded under a name, repo id, path, or fingerprint (full or 12+ hex prefix)."""
    conds = [BaseModelRow.name == text, BaseModelRow.repo_id == text, BaseModelRow.path == text]
    hexpart = hex_prefix(text, MIN_PREFIX)
    if hexpart is not None:
        lo, hi = prefix_range(hexpart)
        for col in (BaseModelRow.signature, BaseModelRow.content_hash):
            conds.append((col >= lo) & (col < hi))
    return list(session.scalars(select(BaseModelRow).where(or_(*conds)).order_by(BaseModelRow.id)))


def all_rows(session: Session) -> list[BaseModelRow]:
    return list(session.scalars(select(BaseModelRow).order_by(BaseModelRow.created_at.desc())))


def delete(session: Session, row: BaseModelRow) -> None:
    """Forget a base record. Adapters made for it keep their own copy of its name and
    fingerprints (their identity), so only the link to this row goes."""
    from sqlalchemy import update

    from .models import Adapter

    session.execute(update(Adapter).where(Adapter.base_id == row.id).values(base_id=None))
    session.delete(row)
