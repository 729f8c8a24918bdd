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

    Through ``plain.py``'s driver cursor, not a session: this runs once per request served,
    and the plain cursor costs a quarter of the time.
    """
    if engine.dialect.name not in TRACKED:
        return None
    from .plain import plain_reads

    with plain_reads(engine, snapshot=False) as run:
        rows = run(_READ, [])
    return int(rows[0][0]) if rows else None
