"""SQLAlchemy 2.0 models of the catalog.

What users filter on lives in indexed columns; the manifest (the identity of an adapter) is
kept verbatim as canonical JSON next to them. The schema is created and changed only by the
Alembic revisions in ``migrations/``; a test checks they produce exactly these models.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeEngine

# Databases whose timestamps carry no time zone: there the column holds UTC, naive.
_NAIVE_DIALECTS = frozenset({"mysql", "mariadb"})
# SQLite keeps text: ISO 8601 in UTC with its offset, one fixed width, so text order is time
# order (the index on adapters.created_at depends on it) and a reader sees the time zone.
SQLITE_FORMAT = (
    "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d+00:00"
)
_SQLITE_UTC = sqlite.DATETIME(
    storage_format=SQLITE_FORMAT,
    regexp=r"(\d+)-(\d+)-(\d+)[ T](\d+):(\d+):(\d+)(?:\.(\d+))?(?:\+00:00|Z)?$",
)


class UTCDateTime(TypeDecorator[datetime]):
    """A moment in time, always timezone-aware UTC in Python.

    ``TIMESTAMP WITH TIME ZONE`` where the database has one (PostgreSQL); on SQLite, text
    like ``2026-01-02 03:04:05.000000+00:00``; on MySQL, a UTC ``DATETIME``. A naive value
    given to it is taken as UTC, as lorahub stored them before revision 0002 (which converts
    older catalogs).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(_SQLITE_UTC)
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name in _NAIVE_DIALECTS else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # a driver that hands back SQLite's text as is
            value = datetime.fromisoformat(value)
        return as_utc(value)


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Blob(Base):
    """A weights file in the blob directory; rows are written after the file is published."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(40), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class BaseModelRow(Base):
    """A base model lorahub has seen: where it was, its fingerprints and its tensor table."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), index=True)
    path: Mapped[str | None] = mapped_column(Text)
    repo_id: Mapped[str | None] = mapped_column(String(256), index=True)
    revision: Mapped[str | None] = mapped_column(String(128))
    signature: Mapped[str] = mapped_column(String(40), index=True)
    content_hash: Mapped[str | None] = mapped_column(String(40), index=True)
    tensor_count: Mapped[int] = mapped_column(Integer)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    tensor_table: Mapped[str] = mapped_column(Text)  # JSON: [[name, dtype, [shape...]], ...]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Adapter(Base):
    """One adapter, identified by the digest of its manifest."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(40), unique=True)
    manifest: Mapped[str] = mapped_column(Text)
    weights_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float, index=True)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    use_dora: Mapped[bool] = mapped_column(Boolean, default=False)
    targets: Mapped[str] = mapped_column(Text)  # comma-separated leaf names, for display
    module_count: Mapped[int] = mapped_column(Integer)
    base_name: Mapped[str | None] = mapped_column(String(512), index=True)
    base_revision: Mapped[str | None] = mapped_column(String(128))
    base_signature: Mapped[str | None] = mapped_column(String(40), index=True)
    base_content_hash: Mapped[str | None] = mapped_column(String(40), index=True)
    base_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id"), index=True)
    origin_kind: Mapped[str] = mapped_column(String(32), index=True)  # import | compose | pull
    origin: Mapped[str] = mapped_column(Text)  # JSON: where it came from (path, repo, ...)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    modules: Mapped[list[AdapterModule]] = relationship(
        back_populates="adapter", cascade="all, delete-orphan", passive_deletes=True
    )
    refs: Mapped[list[Ref]] = relationship(
        back_populates="adapter", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        # `ls --filter rank=N --limit K` walks the adapters whose config says r = N in
        # created_at order; those with a module of rank N come from ix_adapter_modules_rank.
        Index("ix_adapters_rank_created_at", "rank", "created_at"),
        # The web list sorted by size walks it (ORDER BY size DESC, id DESC ... LIMIT).
        Index("ix_adapters_size_id", "size", "id"),
    )


class AdapterModule(Base):
    """One adapted module of an adapter, so `--filter target=q_proj` is an index lookup."""

    __tablename__ = "adapter_modules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    module: Mapped[str] = mapped_column(String(512))
    leaf: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    in_features: Mapped[int] = mapped_column(Integer)
    out_features: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)

    adapter: Mapped[Adapter] = relationship(back_populates="modules")

    __table_args__ = (
        Index("ix_adapter_modules_adapter", "adapter_id"),
        Index("ix_adapter_modules_leaf", "leaf", "adapter_id"),
        Index("ix_adapter_modules_module", "module", "adapter_id"),
        # `--filter rank=N` also matches any module of rank N (an EXISTS over this table).
        Index("ix_adapter_modules_rank", "rank", "adapter_id"),
    )


class Ref(Base):
    """``name:tag`` pointing at an adapter; one per base variant, like multi-platform images."""

    __tablename__ = "refs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    tag: Mapped[str] = mapped_column(String(128))
    variant: Mapped[str] = mapped_column(String(600))  # the base this variant is for ("" = any)
    adapter_id: Mapped[int] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    adapter: Mapped[Adapter] = relationship(back_populates="refs")

    __table_args__ = (UniqueConstraint("name", "tag", "variant", name="uq_ref_variant"),)


class MergedEntry(Base):
    """An on-demand merged checkpoint under ``<home>/merged/``, with its provenance."""

    __tablename__ = "merged"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(40), unique=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    base_content_hash: Mapped[str] = mapped_column(String(40), index=True)
    base_name: Mapped[str] = mapped_column(String(512))
    adapters: Mapped[str] = mapped_column(Text)  # JSON: [[digest, weight], ...]
    dtype: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Token(Base):
    """An access token of ``lorahub serve``: only the sha256 of its secret is kept."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))  # read | write
    namespaces: Mapped[str] = mapped_column(Text)  # JSON list; [] = every namespace
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CatalogGeneration(Base):
    """One row whose ``n`` triggers move on every change to the tables an adapter's answer
    reads (migration 0005): a reader's kept answers hold while it stands."""

    __tablename__ = "catalog_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
