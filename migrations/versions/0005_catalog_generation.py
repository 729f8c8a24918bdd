"""a generation number that every change to what the catalog answers moves

One row, ``catalog_generation.n``, moved by triggers on each table a read of an adapter
depends on (``blobs``, ``base_models``, ``adapters``, ``adapter_modules``, ``refs``,
``merged``; not ``tokens``, whose last-used time moves on reads). A reader that kept an
answer together with the number it read first knows the answer still holds while the number
has not moved, whichever process or command changed the catalog: ``lorahub serve`` keeps its
metadata answers so, one cheap lookup a request instead of the catalog queries.

Triggers on SQLite (one per table and statement kind) and PostgreSQL (one function, one
statement-level trigger per table). On any other database nothing moves the row, so
:func:`lorahub.catalog.generation.current` answers None there and nothing is kept.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 09:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("blobs", "base_models", "adapters", "adapter_modules", "refs", "merged")
_BUMP = "UPDATE catalog_generation SET n = n + 1 WHERE id = 1"


def upgrade() -> None:
    op.create_table(
        "catalog_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO catalog_generation (id, n) VALUES (1, 0)")
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table in TABLES:
            for event in ("INSERT", "UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_{event.lower()}_generation AFTER {event} ON {table} "
                    f"BEGIN {_BUMP}; END"
                )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION lorahub_bump_generation() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN {_BUMP}; RETURN NULL; END $$"
        )
        for table in TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_generation AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION lorahub_bump_generation()"
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table in TABLES:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_{event}_generation")
    elif dialect == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_generation ON {table}")
        op.execute("DROP FUNCTION IF EXISTS lorahub_bump_generation()")
    op.drop_table("catalog_generation")
