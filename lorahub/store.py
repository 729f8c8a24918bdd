"""``Store``: one open lorahub store, its files (blobs, records) and its catalog.

What every operation of :class:`lorahub.hub.Hub` stands on: the folders made and checked on
open, the catalog engine migrated on first use, plain-SQL reads that skip SQLAlchemy when
they can, and write transactions whose journal events keep commit order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import layout
from .blobs import BlobStore
from .catalog import lite, reads
from .digest import Digest
from .errors import StoreError
from .lazy import lazy_module
from .records import Records, backfilled
from .refs import parse

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from . import upkeep
    from .adapter import LoraAdapter
    from .catalog import db, plain
    from .info import AdapterInfo
    from .settings import Settings
else:  # SQLAlchemy, behind these, takes longer to import than `show` may take in all
    upkeep = lazy_module("lorahub.upkeep")
    db = lazy_module("lorahub.catalog.db")
    plain = lazy_module("lorahub.catalog.plain")

# A write transaction's session and the journal events to append when it commits.
Writing = tuple["Session", list[dict[str, Any]]]


def open_blobs(settings: Settings) -> BlobStore:
    """The blob directory under the home, or the object store ``settings.blobs_url`` names
    (its read-through cache under ``<home>/blobcache``)."""
    if settings.blobs_url is None:
        return BlobStore(settings.home / "blobs", settings.home / "tmp")
    from .s3blobs import S3BlobStore, parse_blobs_url

    return S3BlobStore(
        parse_blobs_url(settings.blobs_url),
        settings.home / "blobcache",
        settings.home / "tmp",
        cache_max_bytes=settings.blobs_cache_max_bytes,
    )


class Store:
    """The store at ``settings.home``: its folders are made (or refused) on open; the
    catalog is opened and migrated only when first needed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home
        layout.prepare(self.home, allow_symlinks=settings.allow_symlinks)
        self.blobs = open_blobs(settings)
        self.records = Records(self.home, self.home / "tmp")
        self.engine_or_none: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The catalog engine, migrated on first use."""
        if self.engine_or_none is None:
            self.engine_or_none = self.open_catalog(check=True)
        return self.engine_or_none

    @contextlib.contextmanager
    def reading(self) -> Iterator[reads.Run]:
        """Plain-SQL reads (:mod:`lorahub.catalog.reads`): through the standard library's
        sqlite3 when the embedded catalog is there and current, so a command that only
        reads never imports SQLAlchemy; else through the engine."""
        if (
            self.engine_or_none is None
            and self.settings.database_url is None
            and backfilled(self.records)  # else the engine's open writes the records first
        ):
            path = self.home / "lorahub.db"
            conn = lite.open_current(path)
            if conn is not None:
                try:
                    yield lite.runner(conn, path)
                    return
                finally:
                    conn.close()
        with plain.plain_reads(self.engine) as run:
            yield run

    def open_catalog(self, *, check: bool) -> Engine:
        """Open and migrate the catalog. With ``check``, a new, empty catalog over a store
        that holds adapters is refused: it would look empty, and ``gc`` would then delete
        every blob. ``fsck`` opens it without the check, to rebuild it."""
        # Files first, then the schema: a concurrent first open migrates before it writes.
        holds = self.records.has_manifests() or self.blobs.any()
        engine = db.make_engine(self.settings.db_url)
        if check and holds and db.current_revision_or_none(engine) is None:
            engine.dispose()
            raise StoreError(
                f"the catalog ({db.safe_url(self.settings.db_url)}) is missing or empty, but "
                f"the store at {self.home} holds adapters; run `lorahub fsck` to rebuild the "
                "catalog from the store's files"
            )
        db.upgrade(engine, self.home / "migrate.lock")
        upkeep.backfill_records(engine, self.records, self.home / "migrate.lock")
        return engine

    def set_aside_if_damaged(self, *, dry_run: bool) -> tuple[str | None, bool]:
        """Before ``fsck``: close the catalog, and move an embedded SQLite catalog that
        cannot be read aside (or rebuild a damaged index). Returns where it went, if it was
        moved, and whether the index was rebuilt; nothing for another database."""
        if self.settings.database_url is not None:
            return None, False
        self.close()
        return upkeep.set_aside_if_damaged(self.home / "lorahub.db", dry_run=dry_run)

    def reopen_unchecked(self) -> Engine:
        """Open the catalog again without the empty-catalog check, for ``fsck`` to rebuild."""
        self.engine_or_none = self.open_catalog(check=False)
        return self.engine_or_none

    @contextlib.contextmanager
    def writing(self) -> Iterator[Writing]:
        """A write transaction whose journal events (appended to the list it yields) are
        written under the catalog's write lock just before the commit, so the journal keeps
        commit order, and confirmed after it; if the commit fails they are marked aborted."""
        events: list[dict[str, Any]] = []
        ids: list[str] = []
        try:
            with db.write_session(self.engine) as s:
                yield s, events
                s.flush()
                ids = self.records.append(events)
        except BaseException:
            self.records.abort(ids)
            raise
        self.records.commit(ids)

    def find_info(self, reference: str) -> AdapterInfo:
        """The adapter a stored reference names (name, ``name:tag`` or digest)."""
        with self.reading() as run:
            return reads.resolve_info(run, parse(reference))

    def load_adapter(self, info: AdapterInfo) -> LoraAdapter:
        """The stored adapter's tensors and config, read from its blob (checked to exist)."""
        from .adapter import LoraAdapter
        from .formats import peft

        tensors, _ = peft.read_safetensors(
            self.blobs.checked_path(Digest.parse(info.weights_digest))
        )
        return LoraAdapter.from_state_dict(info.config, tensors, info.origin.get("metadata"))

    def close(self) -> None:
        if self.engine_or_none is not None:
            self.engine_or_none.dispose()
            self.engine_or_none = None
