"""The catalog's engine: SQLite in WAL mode with immediate write transactions, migrated by
Alembic when a store is opened.

Readers never block in WAL; writers take the write lock at ``BEGIN IMMEDIATE`` so two
processes never both read-then-upgrade and deadlock, and the busy timeout makes them queue
instead of failing with "database is locked".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session

from ..errors import StoreError
from .lite import BUSY_TIMEOUT_S, SCHEMA_HEAD

if TYPE_CHECKING:
    import sqlite3

    from sqlalchemy.pool import ConnectionPoolEntry


def migrations_dir() -> Path:
    """Revisions ship inside the wheel as ``lorahub/_migrations``; from a source checkout
    they are the top-level ``migrations/``."""
    pkg = Path(__file__).resolve().parent.parent
    packaged = pkg / "_migrations"
    return packaged if packaged.is_dir() else pkg.parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and immediate writes."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(
        url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE below is honoured.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        _enable_wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("lorahub_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _enable_wal(cursor: sqlite3.Cursor) -> None:
    """Switch a database to WAL. Several processes opening a new store at once can find the
    switch refused with "database is locked" (SQLite does not wait on it), so retry."""
    import sqlite3

    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def current_revision_or_none(engine: Engine) -> str | None:
    """:func:`current_revision`, a database that cannot be read being a ``StoreError``."""
    try:
        return current_revision(engine)
    except Exception as exc:  # sqlalchemy's errors about the database itself
        raise StoreError(f"cannot open the catalog at {engine.url!r}: {_reason(exc)}") from exc


def upgrade(engine: Engine, lock_path: Path | None) -> None:
    """Bring the schema to the newest revision, unless it is there already (the usual case,
    which must not pay for importing Alembic)."""
    try:
        if current_revision(engine) == SCHEMA_HEAD:
            return
        lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if lock_path is not None:
            from filelock import FileLock

            lock = FileLock(str(lock_path))
        with lock:
            if current_revision(engine) == SCHEMA_HEAD:
                return
            from alembic import command
            from alembic.config import Config

            cfg = Config()
            cfg.set_main_option("script_location", str(migrations_dir()))
            # IMMEDIATE: the migration reads, then writes; a deferred transaction would fail
            # at that upgrade instead of waiting if another process held the lock.
            with engine.connect() as conn:
                conn.execution_options(lorahub_write=True)  # in place, in SQLAlchemy 2
                with conn.begin():
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
    except StoreError:
        raise
    except Exception as exc:  # sqlalchemy/alembic errors about the database itself
        raise StoreError(f"cannot open the catalog at {engine.url!r}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The database's own words, on one line, without SQLAlchemy's statement and link."""
    from sqlalchemy.exc import DBAPIError

    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
    if "disk is full" in text or "disk I/O error" in text:
        text += " (is the disk full?)"
    if "malformed" in text or "not a database" in text:
        text += "; run `lorahub fsck` to rebuild the catalog from the store's files"
    return text


@contextlib.contextmanager
def _database_errors(engine: Engine) -> Iterator[None]:
    """A full disk, a read-only or damaged database file: a StoreError, not a traceback.
    SQLite rolls the transaction back, so what the catalog held is untouched."""
    from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

    try:
        yield
    except IntegrityError:
        raise  # a unique violation: callers that expect one retry
    except OperationalError as exc:
        raise StoreError(f"the catalog at {engine.url!r} refused a change: {_reason(exc)}") from exc
    except DBAPIError as exc:  # the database's own failures; a misuse of the ORM stays a bug
        raise StoreError(f"the catalog at {engine.url!r} failed: {_reason(exc)}") from exc


@contextlib.contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction holds the write lock from its first statement."""
    with _database_errors(engine), engine.connect() as conn:
        conn = conn.execution_options(lorahub_write=True)
        with Session(bind=conn) as session, session.begin():
            yield session


@contextlib.contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with _database_errors(engine), Session(engine) as session:
        yield session
