"""an index on adapter sizes

The web page's adapter list sorts by size (largest first, the row id breaking ties); without
an index every page of it sorted the whole table (seconds at 100,000 adapters). With it, a
page walks the index and stops once it has its rows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 09:45:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_adapters_size_id", "adapters", ["size", "id"])


def downgrade() -> None:
    op.drop_index("ix_adapters_size_id", table_name="adapters")
