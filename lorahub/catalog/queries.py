"""Catalog reads and writes, each on a session the caller owns (so callers decide what is
one transaction)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session, selectinload

from ..adapter import LoraAdapter
from ..errors import AdapterNotFound, AmbiguousReference, InvalidReference
from ..info import AdapterInfo
from ..manifest import BaseRef
from ..refs import Reference, format_ref
from .models import Adapter, AdapterModule, Blob, Ref

FILTER_KEYS = ("rank", "alpha", "target", "module", "base", "dora", "rslora", "origin", "name")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


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
    content, like a multi-platform image. Otherwise it is a plain tag move: an adapter with
    an unverified base replaces every variant, and any adapter replaces an unverified one,
    so a new version never hides behind the old one it was meant to replace.
    """
    base = base_of(row)
    for ref in session.scalars(select(Ref).where(Ref.name == name, Ref.tag == tag)).all():
        if ref.variant == base.variant or not base.verified or not base_of(ref.adapter).verified:
            session.delete(ref)
    session.flush()
    session.add(
        Ref(name=name, tag=tag, variant=base.variant, adapter_id=row.id, created_at=utcnow())
    )
    session.flush()


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
        row = adapter_by_digest(session, f"xxh128:{ref.prefix}")
        return [row] if row else []
    lo = f"xxh128:{ref.prefix}"
    # A range scan on the unique digest index instead of LIKE, which SQLite won't index here.
    return list(
        session.scalars(
            select(Adapter)
            .where(Adapter.digest >= lo, Adapter.digest < lo + "g")
            .limit(20)
            .options(selectinload(Adapter.refs))
        )
    )


def resolve_one(session: Session, ref: Reference) -> Adapter:
    """The single adapter a reference names; errors list what it could mean."""
    rows = candidates(session, ref)
    if not rows:
        raise AdapterNotFound(ref.text)
    if len(rows) > 1:
        if ref.name is not None and rows[0].refs is not None:
            lines = [
                f"{r.digest[7:19]}  for base {base_of(r).name or base_of(r).variant or '?'}"
                for r in rows
            ]
            raise AmbiguousReference(
                ref.text,
                lines,
                hint="it has one variant per base model: name one by digest (@<digest>), or "
                "pick it for a base (`lorahub resolve NAME --base BASE`; show, export, push "
                "and rm take --base too)",
            )
        raise AmbiguousReference(ref.text, [r.digest for r in rows])
    return rows[0]


def parse_filters(filters: Iterable[str] | Mapping[str, str]) -> list[tuple[str, str]]:
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


_TRUE, _FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


def _bool(value: str) -> bool:
    return value.lower() in _TRUE


def list_adapters(
    session: Session,
    filters: Sequence[tuple[str, str]] = (),
    limit: int | None = None,
    adapter_ids: Iterable[int] | None = None,
) -> list[Adapter]:
    q = select(Adapter)
    for key, value in filters:
        if key == "rank":
            q = q.where(Adapter.rank == int(float(value)))
        elif key == "alpha":
            q = q.where(Adapter.alpha == float(value))
        elif key in ("target", "module"):
            col = AdapterModule.leaf if key == "target" else AdapterModule.module
            q = q.where(exists().where(AdapterModule.adapter_id == Adapter.id, col == value))
        elif key == "base":
            q = q.where(
                (Adapter.base_name == value)
                | (Adapter.base_signature == value)
                | (Adapter.base_content_hash == value)
            )
        elif key == "dora":
            q = q.where(Adapter.use_dora == _bool(value))
        elif key == "rslora":
            q = q.where(Adapter.use_rslora == _bool(value))
        elif key == "origin":
            q = q.where(Adapter.origin_kind == value)
        elif key == "name":
            q = q.where(exists().where(Ref.adapter_id == Adapter.id, Ref.name == value))
    if adapter_ids is not None:
        q = q.where(Adapter.id.in_(list(adapter_ids)))
    q = q.order_by(Adapter.created_at.desc(), Adapter.id.desc()).options(selectinload(Adapter.refs))
    if limit:
        q = q.limit(limit)
    return list(session.scalars(q))


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
        origin=json.loads(row.origin),
        created_at=row.created_at,
        manifest=json.loads(row.manifest),
    )


def remove_ref(session: Session, name: str, tag: str, adapter_id: int | None = None) -> int:
    q = delete(Ref).where(Ref.name == name, Ref.tag == tag)
    if adapter_id is not None:
        q = q.where(Ref.adapter_id == adapter_id)
    return session.execute(q).rowcount or 0


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
