"""The embedded SQLite catalog opened with the standard library, for commands that only
read: they answer before ``import sqlalchemy`` alone would have finished."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .reads import Run

# The newest Alembic revision; a test checks it equals the head of migrations/.
SCHEMA_HEAD = "0006"
BUSY_TIMEOUT_S = 60


def open_current(path: Path) -> sqlite3.Connection | None:
    """A connection to the catalog at ``path`` when it exists and needs no migration;
    None otherwise (the caller then opens it through SQLAlchemy, which migrates it or says
    what is wrong)."""
    try:
        if path.stat().st_size == 0:
            return None
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S)
    except (OSError, sqlite3.Error):
        return None
    try:
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone() or (None,)
    except sqlite3.Error:
        version = None
    if version != SCHEMA_HEAD:
        conn.close()
        return None
    conn.isolation_level = None
    conn.execute("BEGIN")  # one snapshot for every read of a command (WAL: no writer waits)
    return conn


def runner(conn: sqlite3.Connection, path: Path) -> Run:
    """Runs statements on ``conn``; the database's own failures are ``StoreError``s."""

    def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            why = str(exc)
            if "malformed" in why or "not a database" in why:
                why += "; run `lorahub fsck` to rebuild the catalog from the store's files"
            raise StoreError(f"the catalog at {path} failed: {why}") from None

    return run
