"""The catalog's engine: SQLite in WAL mode with immediate write transactions, or
PostgreSQL with a transaction-level advisory lock; migrated by Alembic when a store is opened.

One writer at a time, on either database: every write transaction takes the catalog's write
lock as its first statement and holds it to its commit (see :func:`write_session`).

- SQLite: readers never block in WAL; writers take the write lock at ``BEGIN IMMEDIATE`` so
  two processes never both read-then-upgrade and deadlock, and the busy timeout makes them
  queue instead of failing with "database is locked".
- PostgreSQL: see :data:`PG_WRITE_LOCK` for the scheme and why it gives the same order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Connection, Engine, create_engine, event, inspect, text
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


#: The key of the catalog's write lock on PostgreSQL (any constant would do: advisory locks
#: belong to one database, so each catalog has its own). "lorahub" in ASCII.
PG_WRITE_LOCK = 0x6C6F7261687562
"""Why one transaction-level advisory lock gives PostgreSQL the order SQLite's ``BEGIN
IMMEDIATE`` gives:

1. One writer at a time. Every write transaction (:func:`write_session`, a migration) runs
   ``pg_advisory_xact_lock(PG_WRITE_LOCK)`` as its first statement. It waits until no other
   transaction of this database holds the lock, which is released only when the holder ends:
   commit, rollback, or its connection dying (a killed process never leaves it held). So
   write transactions run one after another, each from its first statement to its commit.
2. Each writer sees every earlier one. Write transactions run at ``READ COMMITTED``, set
   explicitly whatever the server's default: each statement takes a fresh snapshot, and
   PostgreSQL makes a commit visible before it releases that transaction's locks, so every
   statement after the lock sees all that earlier holders committed. (At ``REPEATABLE READ``
   or ``SERIALIZABLE`` the snapshot would be the lock statement's own, taken before it
   waited: a writer would decide on rows that may have changed.)
3. The journal keeps commit order. ``Store.writing`` appends a transaction's journal events
   after its last statement and before its commit, all under the lock; the next writer
   cannot begin before that commit, so journal order is commit order, as on SQLite.
4. ``gc`` racing adds. gc plans and forgets its blob rows in one write transaction and
   deletes files in another, re-checking each under the lock; an add checks its blob file and
   inserts its rows in one. They exclude each other exactly as on SQLite, so the reasoning in
   :mod:`lorahub.upkeep.gc` and :mod:`lorahub.storing` holds unchanged.
5. Readers. Other transactions run at ``REPEATABLE READ READ ONLY``: one snapshot for every
   statement of a read, like a SQLite read transaction in WAL; never blocked by the writer,
   never failing on a conflict (read-only), and a write attempted outside the lock is an
   error rather than a silent race.
6. Waiting. ``lock_timeout`` bounds the wait for the lock as SQLite's busy timeout does
   (``BUSY_TIMEOUT_S``); past it, the writer's change fails with a :class:`StoreError`.

The unique constraints stay the backstop for anything that writes without the lock (a
person in ``psql``): ``storing`` retries an add whose insert met one. Everything here lives
and dies with one transaction, so a pooler in transaction mode (PgBouncer) keeps it whole.
"""

_SECRET_QUERY_KEYS = ("pass", "pwd", "secret", "token", "key")


def safe_url(url: str | URL) -> str:
    """``url`` fit to print: its password, and any query value whose key looks secret
    (``?password=``, ``sslkey``...), replaced by ``***``. A string that is not a URL at all is
    not echoed (it may be a password pasted in the wrong place)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError:
        return "<not a database URL>"
    secret = {k: "***" for k in parsed.query if any(w in k.lower() for w in _SECRET_QUERY_KEYS)}
    shown = parsed.update_query_dict(secret).render_as_string(hide_password=True)
    return shown.replace("=%2A%2A%2A", "=***")


def _secrets(url: URL) -> list[str]:
    """The URL's secret values, to be scrubbed from any message the driver writes."""
    values = [url.password] if url.password else []
    for k, v in url.query.items():
        if any(w in k.lower() for w in _SECRET_QUERY_KEYS):
            values += [v] if isinstance(v, str) else list(v)
    return [str(v) for v in values if v]


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and immediate writes;
    PostgreSQL gets the advisory write lock (:data:`PG_WRITE_LOCK`), and a plain
    ``postgresql://`` URL is driven by psycopg 3 (the ``lorahub-store[postgres]`` extra).

    Raises:
        StoreError: ``url`` is not a database URL, or its driver is not installed.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(
            "LORAHUB_DATABASE_URL is not a database URL; give one like "
            "postgresql+psycopg://user:password@host:5432/lorahub"
        ) from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        try:
            engine = create_engine(parsed, pool_pre_ping=True)
        except (ImportError, NoSuchModuleError) as exc:
            hint = (
                "; install it with `pip install 'lorahub-store[postgres]'`"
                if parsed.get_backend_name() == "postgresql"
                else ""
            )
            raise StoreError(
                f"cannot use the catalog at {safe_url(parsed)}: its driver "
                f"{parsed.get_driver_name()!r} is not available ({exc}){hint}"
            ) from None
        if engine.dialect.name == "postgresql":
            event.listen(engine, "begin", _pg_begin)
        return engine
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


def _pg_begin(conn: Connection) -> None:
    """Open a PostgreSQL transaction as :data:`PG_WRITE_LOCK` explains: a write one at READ
    COMMITTED holding the write lock from its first statement, any other a read-only
    snapshot. With psycopg 3 the isolation level and access mode ride on its own ``BEGIN``
    (no round trip of their own: a resolve is mostly round trips)."""
    write = bool(conn.get_execution_options().get("lorahub_write"))
    level = "READ COMMITTED" if write else "REPEATABLE READ"
    if conn.dialect.driver == "psycopg":
        from psycopg import IsolationLevel

        dbapi: Any = conn.connection.dbapi_connection  # idle: SQLAlchemy has not begun yet
        dbapi.isolation_level = IsolationLevel[level.replace(" ", "_")]
        dbapi.read_only = not write
    else:
        conn.exec_driver_sql(
            f"SET TRANSACTION ISOLATION LEVEL {level}, READ {'WRITE' if write else 'ONLY'}"
        )
    if write:
        conn.exec_driver_sql(
            f"SELECT set_config('lock_timeout', '{BUSY_TIMEOUT_S}s', true), "
            f"pg_advisory_xact_lock({PG_WRITE_LOCK})"
        )


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
        raise StoreError(
            f"cannot open the catalog at {safe_url(engine.url)}: {reason(exc, engine.url)}"
        ) from exc


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
        raise StoreError(
            f"cannot open the catalog at {safe_url(engine.url)}: {reason(exc, engine.url)}"
        ) from exc


def reason(exc: BaseException, url: URL) -> str:
    """The database's own words, on one line, without SQLAlchemy's statement and link, and
    without the URL's password should the driver have quoted it."""
    from sqlalchemy.exc import DBAPIError

    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    if "lock timeout" in text:
        text += (
            f" (another process held the catalog's write lock for over {BUSY_TIMEOUT_S} s; "
            "try again)"
        )
    if "disk is full" in text or "disk I/O error" in text:
        text += " (is the disk full?)"
    if "malformed" in text or "not a database" in text:
        text += "; run `lorahub fsck` to rebuild the catalog from the store's files"
    return text


@contextlib.contextmanager
def database_errors(engine: Engine) -> Iterator[None]:
    """A full disk, a read-only or damaged database file: a StoreError, not a traceback.
    SQLite rolls the transaction back, so what the catalog held is untouched."""
    from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

    try:
        yield
    except IntegrityError:
        raise  # a unique violation: callers that expect one retry
    except OperationalError as exc:
        raise StoreError(
            f"the catalog at {safe_url(engine.url)} refused a change: {reason(exc, engine.url)}"
        ) from exc
    except DBAPIError as exc:  # the database's own failures; a misuse of the ORM stays a bug
        raise StoreError(
            f"the catalog at {safe_url(engine.url)} failed: {reason(exc, engine.url)}"
        ) from exc


@contextlib.contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction holds the write lock from its first statement."""
    with database_errors(engine), engine.connect() as conn:
        conn = conn.execution_options(lorahub_write=True)
        with Session(bind=conn) as session, session.begin():
            yield session


@contextlib.contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with database_errors(engine), Session(engine) as session:
        yield session
