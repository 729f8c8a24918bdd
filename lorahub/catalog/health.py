"""The catalog database's own health: its integrity check, and setting aside a SQLite file
that cannot be read so that ``fsck`` can rebuild a fresh one (never deleting it)."""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, text


def integrity_problems(engine: Engine, *, quick: bool = False) -> list[str]:
    """What the database itself reports as damaged (SQLite's ``quick_check`` or
    ``integrity_check``; an index that disagrees with its table is one). Empty when sound
    or when the database has no such check."""
    if engine.dialect.name != "sqlite":
        return []
    from sqlalchemy.exc import DBAPIError

    pragma = "quick_check" if quick else "integrity_check"
    try:
        with engine.connect() as conn:
            lines = [r[0] for r in conn.execute(text(f"PRAGMA {pragma}"))]
    except DBAPIError as exc:  # too damaged to check: that is the answer
        return [str(exc.orig or exc).splitlines()[0]]
    return [] if lines == ["ok"] else lines


def set_aside_if_damaged(db_path: Path, *, dry_run: bool = False) -> tuple[str | None, bool]:
    """Check a SQLite catalog file. An index-only fault is rebuilt in place (``REINDEX``);
    a file SQLite cannot read is renamed aside (never deleted) with its WAL, so a fresh
    catalog can be rebuilt. Returns (where it was moved, whether it was reindexed)."""
    if not db_path.exists() or db_path.stat().st_size == 0:
        return None, False
    try:
        problems = sqlite_check(db_path)
        if not problems:
            return None, False
        if all("index" in p for p in problems):
            if dry_run:
                return None, True
            con = sqlite3.connect(db_path)
            try:
                con.execute("REINDEX")
                con.commit()
            finally:
                con.close()
            if not sqlite_check(db_path):
                return None, True
    except sqlite3.DatabaseError:
        pass
    if dry_run:
        return str(db_path), False
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = db_path.with_name(f"{db_path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(db_path) + suffix)
        if src.exists():
            os.rename(src, Path(str(aside) + suffix))
    return str(aside), False


def sqlite_check(path: Path) -> list[str]:
    """``PRAGMA integrity_check`` of a SQLite file, opened directly (no engine, no WAL
    switch): empty when sound."""
    con = sqlite3.connect(path)
    try:
        lines = [r[0] for r in con.execute("PRAGMA integrity_check")]
    finally:
        con.close()
    return [] if lines == ["ok"] else lines
