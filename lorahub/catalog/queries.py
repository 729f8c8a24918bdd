"""Catalog reads and writes, each on a session the caller owns (so callers decide what is
one transaction)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, Select, delete, exists, func, select
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
    if len(rows) != 1:
        _not_one(ref, ref.name is not None, [(r.digest, base_of(r)) for r in rows])
    return rows[0]


def _not_one(ref: Reference, by_name: bool, found: Sequence[tuple[str, BaseRef]]) -> None:
    """Raise for a reference that matched nothing, or several (digest, base) pairs."""
    if not found:
        raise AdapterNotFound(ref.text)
    if by_name:
        lines = [f"{d[7:19]}  for base {b.name or b.variant or '?'}" for d, b in found]
        raise AmbiguousReference(
            ref.text,
            lines,
            hint="it has one variant per base model: name one by digest (@<digest>), or "
            "pick it for a base (`lorahub resolve NAME --base BASE`; show, export, push "
            "and rm take --base too)",
        )
    raise AmbiguousReference(ref.text, [d for d, _ in found])


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


def _where(filters: Sequence[tuple[str, str]]) -> list[ColumnElement[bool]]:
    """The WHERE clauses of parsed filters, on the tables' columns (plain Core: no ORM)."""
    a, m, r = Adapter.__table__.c, AdapterModule.__table__.c, Ref.__table__.c
    out: list[ColumnElement[bool]] = []
    for key, value in filters:
        if key == "rank":
            out.append(a.rank == int(float(value)))
        elif key == "alpha":
            out.append(a.alpha == float(value))
        elif key in ("target", "module"):
            col = m.leaf if key == "target" else m.module
            out.append(exists().where(m.adapter_id == a.id, col == value))
        elif key == "base":
            out.append(
                (a.base_name == value)
                | (a.base_signature == value)
                | (a.base_content_hash == value)
            )
        elif key == "dora":
            out.append(a.use_dora == _bool(value))
        elif key == "rslora":
            out.append(a.use_rslora == _bool(value))
        elif key == "origin":
            out.append(a.origin_kind == value)
        elif key == "name":
            out.append(exists().where(r.adapter_id == a.id, r.name == value))
    return out


def list_adapters(
    session: Session,
    filters: Sequence[tuple[str, str]] = (),
    limit: int | None = None,
    adapter_ids: Iterable[int] | None = None,
) -> list[Adapter]:
    q = select(Adapter).where(*_where(filters))
    if adapter_ids is not None:
        q = q.where(Adapter.id.in_(list(adapter_ids)))
    q = q.order_by(Adapter.created_at.desc(), Adapter.id.desc()).options(selectinload(Adapter.refs))
    if limit:
        q = q.limit(limit)
    return list(session.scalars(q))


# --- reads that build AdapterInfo straight from rows (plain Core): listing thousands of
# adapters, or answering one `show`, needs neither ORM objects nor mapper configuration.

_INFO_COLUMNS = (
    "id",
    "digest",
    "manifest",
    "weights_digest",
    "size",
    "rank",
    "alpha",
    "use_rslora",
    "use_dora",
    "targets",
    "module_count",
    "base_name",
    "base_revision",
    "base_signature",
    "base_content_hash",
    "origin_kind",
    "origin",
    "created_at",
)
_IN_BATCH = 500  # ids per IN (...): well under every SQLite build's variable limit


def _info_select() -> Select[Any]:
    a = Adapter.__table__.c
    return select(*(a[name] for name in _INFO_COLUMNS))


def _infos(session: Session, stmt: Select[Any]) -> list[AdapterInfo]:
    rows = list({row[0]: row for row in session.execute(stmt).all()}.values())
    refs = _refs_of(session, [row[0] for row in rows])
    return [_row_info(row, refs.get(row[0], ())) for row in rows]


def _refs_of(session: Session, ids: Sequence[int]) -> dict[int, list[str]]:
    """``name:tag`` of each adapter id, in one query or a few."""
    r = Ref.__table__.c
    q = select(r.adapter_id, r.name, r.tag)
    out: dict[int, list[str]] = {}
    if len(ids) > 4 * _IN_BATCH:  # most of the catalog: reading every ref beats many INs
        wanted = set(ids)
        batches: list[Select[Any]] = [q]
    else:
        wanted = None
        batches = [
            q.where(r.adapter_id.in_(ids[i : i + _IN_BATCH])) for i in range(0, len(ids), _IN_BATCH)
        ]
    for stmt in batches:
        for adapter_id, name, tag in session.execute(stmt).all():
            if wanted is None or adapter_id in wanted:
                out.setdefault(adapter_id, []).append(format_ref(name, tag))
    return out


def _row_info(row: Sequence[Any], refs: Iterable[str]) -> AdapterInfo:
    """An info from a row of ``_INFO_COLUMNS`` (unpacked by position: by name costs more
    than the rest of the work when there are 100,000 rows)."""
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
        use_rslora=use_rslora,
        use_dora=use_dora,
        targets=tuple(t for t in targets.split(",") if t),
        module_count=module_count,
        size=size,
        weights_digest=weights_digest,
        base=BaseRef(base_name, base_revision, base_signature, base_content_hash),
        origin_kind=origin_kind,
        origin_text=origin,
        created_at=created_at,
        manifest_text=manifest,
    )


def list_infos(
    session: Session, filters: Sequence[tuple[str, str]] = (), limit: int | None = None
) -> list[AdapterInfo]:
    """What :func:`list_adapters` finds, newest first, as infos (manifests left unparsed)."""
    a = Adapter.__table__.c
    q = _info_select().where(*_where(filters)).order_by(a.created_at.desc(), a.id.desc())
    if limit:
        q = q.limit(limit)
    return _infos(session, q)


def candidate_infos(session: Session, ref: Reference) -> tuple[list[AdapterInfo], bool]:
    """What :func:`candidates` finds, as infos, and whether they were found by name (so
    several are base variants of one ``name:tag``, not a prefix of several digests)."""
    a, r = Adapter.__table__.c, Ref.__table__.c
    if ref.name is not None:
        # In the order of the ref's unique index (by variant), as the ORM join returned them.
        named = (
            _info_select()
            .join(Ref.__table__, r.adapter_id == a.id)
            .where(r.name == ref.name, r.tag == ref.tag)
            .order_by(r.variant, a.id)
        )
        infos = _infos(session, named)
        if infos or ref.prefix is None:
            return infos, True
    assert ref.prefix is not None
    lo = f"xxh128:{ref.prefix}"
    if len(ref.prefix) == 32:
        return _infos(session, _info_select().where(a.digest == lo)), False
    # A range scan on the unique digest index instead of LIKE, which SQLite won't index here.
    prefixed = _info_select().where(a.digest >= lo, a.digest < lo + "g").limit(20)
    return _infos(session, prefixed), False


def resolve_info(session: Session, ref: Reference) -> AdapterInfo:
    """What :func:`resolve_one` finds, as an info; the same errors."""
    infos, by_name = candidate_infos(session, ref)
    if len(infos) != 1:
        _not_one(ref, by_name, [(i.digest, i.base) for i in infos])
    return infos[0]


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
