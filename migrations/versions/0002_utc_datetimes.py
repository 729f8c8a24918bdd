"""timezone-aware datetimes

Every timestamp the catalog keeps becomes an explicit UTC moment. lorahub always wrote UTC,
without saying so; this revision says so in the data:

- PostgreSQL: ``TIMESTAMP`` columns become ``TIMESTAMP WITH TIME ZONE``, each value read as
  UTC (``AT TIME ZONE 'UTC'``), not in the server's time zone.
- SQLite: the text ``2026-01-02 03:04:05.000000`` becomes ``2026-01-02 03:04:05.000000+00:00``
  (the format :class:`lorahub.catalog.models.UTCDateTime` writes); every value gains the same
  suffix, so text order stays time order.
- MySQL/MariaDB: ``DATETIME`` has no time zone; the values already are UTC and stay.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = (
    ("blobs", "created_at"),
    ("base_models", "created_at"),
    ("adapters", "created_at"),
    ("refs", "created_at"),
    ("merged", "created_at"),
    ("merged", "last_used_at"),
)
SUFFIX = "+00:00"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table, column in COLUMNS:
        if dialect == "sqlite":
            # Only values without an offset: a rerun, or a value written with one, is kept.
            op.execute(
                f"UPDATE {table} SET {column} = {column} || '{SUFFIX}' "
                f"WHERE {column} IS NOT NULL AND {column} NOT LIKE '%{SUFFIX}'"
            )
        elif dialect == "postgresql":
            op.alter_column(
                table,
                column,
                type_=sa.DateTime(timezone=True),
                existing_type=sa.DateTime(),
                existing_nullable=False,
                postgresql_using=f"{column} AT TIME ZONE 'UTC'",
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table, column in COLUMNS:
        if dialect == "sqlite":
            op.execute(
                f"UPDATE {table} SET {column} = substr({column}, 1, length({column}) - "
                f"{len(SUFFIX)}) WHERE {column} LIKE '%{SUFFIX}'"
            )
        elif dialect == "postgresql":
            op.alter_column(
                table,
                column,
                type_=sa.DateTime(),
                existing_type=sa.DateTime(timezone=True),
                existing_nullable=False,
                postgresql_using=f"{column} AT TIME ZONE 'UTC'",
            )
