"""The catalog's generation: a number every change to what it answers moves (migration
0005's triggers), so an answer kept with the number read before it still holds while the
number stands, whichever process or command wrote since."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

#: The databases migration 0005 puts the triggers on.
TRACKED = ("sqlite", "postgresql")

_READ = "SELECT n FROM catalog_generation WHERE id = 1"


def current(engine: Engine) -> int | None:
    """The generation now; None on a database without the triggers (nothing to trust).

    A pooled driver connection, not a SQLAlchemy one: this runs once per request served,
    and the plain cursor costs a quarter of the time. The pool rolls back on check-in.
    """
    if engine.dialect.name not in TRACKED:
        return None
    from .db import database_errors

    with database_errors(engine):
        row = _read(engine)
    return None if row is None else int(row[0])


def _read(engine: Engine) -> tuple[int] | None:
    conn = engine.raw_connection()
    try:
        cursor = conn.cursor()
        try:
            cursor.execute(_READ)
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        conn.close()
    return row
