"""Plain-SQL catalog reads on the driver's own connections: what ``lorahub serve`` runs for
each request, at a fraction of an ORM session's cost.

A session costs about 0.25 ms per block of reads, and a pool checkout (with its reset on
return) about 50 µs: as much as the indexed reads a model info or a ``HEAD`` needs. So
:func:`plain_reads` runs ``reads.Run`` statements on a driver cursor, in one read snapshot
begun as a read session's is (SQLite ``BEGIN DEFERRED``; PostgreSQL a read-only REPEATABLE
READ transaction), and :func:`connection` lends the connection:

* on SQLite, a thread that asked to (:func:`keep_connections`: the event loop's thread of
  ``lorahub serve``, which runs most of each request's reads) keeps one of its own per
  engine (made by the engine, so with its pragmas, then detached from its pool), closed
  when the engine is disposed; a block nested in another on that thread borrows from the
  pool instead. Other threads borrow from the pool: each connection has its own page
  cache, and dozens of cold ones cost more reads than a pool of warm ones;
* on PostgreSQL, the pool's (a connection per thread would multiply the server's).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from ..errors import StoreError
from .db import database_errors, read_session, reason, safe_url

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.pool import PoolProxiedConnection

Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

_SQLITE = ("sqlite", "pysqlite")
_PSYCOPG = ("postgresql", "psycopg")


@dataclass
class _Own:
    conn: PoolProxiedConnection
    driver: Any  # its DBAPI connection, closed by us (invalidating a detached one does not)
    busy: bool = False

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone with its database file
            self.driver.close()


_owned: weakref.WeakKeyDictionary[Engine, dict[int, _Own]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_keeping = threading.local()


def keep_connections() -> None:
    """From now on this thread keeps a SQLite connection of its own per engine for its
    plain reads (until the engine is disposed)."""
    _keeping.on = True


@contextlib.contextmanager
def connection(engine: Engine) -> Iterator[PoolProxiedConnection]:
    """A driver connection of ``engine`` for a few reads; leave it as found (no open
    transaction)."""
    driver = (engine.dialect.name, engine.dialect.driver)
    if driver != _SQLITE or not getattr(_keeping, "on", False):
        with _pooled(engine) as conn:
            yield conn
        return
    own = _own(engine)
    if own.busy:  # nested in another block on this thread
        with _pooled(engine) as conn:
            yield conn
        return
    own.busy = True
    try:
        yield own.conn
    finally:
        own.busy = False
        if not own.conn.is_valid:  # broken (invalidated by the block): make a new one next
            _forget(engine, own)


@contextlib.contextmanager
def _pooled(engine: Engine) -> Iterator[PoolProxiedConnection]:
    with database_errors(engine):  # a refused connection: SQLAlchemy's own errors
        conn = engine.raw_connection()
    try:
        yield conn
    finally:
        conn.close()


def _own(engine: Engine) -> _Own:
    thread = threading.get_ident()
    with _lock:
        mine = _owned.get(engine)
        if mine is None:
            mine = _owned[engine] = {}
            event.listen(engine, "engine_disposed", _close_all)
        own = mine.get(thread)
    if own is None:
        with database_errors(engine):
            conn = engine.raw_connection()
        conn.detach()  # ours now: the pool neither counts nor resets it
        own = _Own(conn, conn.dbapi_connection)
        with _lock:
            mine[thread] = own
    return own


def _forget(engine: Engine, own: _Own) -> None:
    with _lock:
        mine = _owned.get(engine, {})
        for thread, held in list(mine.items()):
            if held is own:
                del mine[thread]
    own.close()


def _close_all(engine: Engine) -> None:
    """``engine_disposed``: every thread's connection of ``engine`` is closed."""
    with _lock:
        mine = _owned.pop(engine, {})
    for own in mine.values():
        own.close()


@contextlib.contextmanager
def plain_reads(engine: Engine, snapshot: bool = True) -> Iterator[Run]:
    """``reads.Run`` statements in one read snapshot (on SQLite and psycopg; other drivers
    take a session). A database failure is a :class:`~lorahub.errors.StoreError`. Without
    ``snapshot``, no transaction is begun for them: for one statement (the catalog's
    generation, read per request), which sees the latest commit either way."""
    driver = (engine.dialect.name, engine.dialect.driver)
    if driver not in (_SQLITE, _PSYCOPG):
        from .queries import runner

        with read_session(engine) as session:
            yield runner(session)
        return
    dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
    sqlite = driver == _SQLITE
    with connection(engine) as conn:
        cursor = None
        try:
            if snapshot and not sqlite:
                from psycopg import IsolationLevel

                raw: Any = conn.driver_connection
                raw.isolation_level = IsolationLevel.REPEATABLE_READ
                raw.read_only = True
            cursor = conn.cursor()

            def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                if not sqlite:
                    sql = sql.replace("%", "%%").replace("?", "%s")
                cursor.execute(sql, tuple(params))
                return [tuple(row) for row in cursor.fetchall()]

            try:
                if snapshot and sqlite:
                    cursor.execute("BEGIN DEFERRED")
                yield run
            except dbapi_error as exc:
                raise StoreError(
                    f"the catalog at {safe_url(engine.url)} failed: {reason(exc, engine.url)}"
                ) from exc
        finally:
            try:
                if cursor is not None:
                    cursor.close()
                conn.rollback()  # nothing was written: the snapshot ends
            except dbapi_error:
                conn.invalidate()  # a connection that cannot roll back is not reused
