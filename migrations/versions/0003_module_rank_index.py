"""an index on module ranks

``ls --filter rank=N`` matches an adapter whose config says ``r = N`` or any of whose modules
has rank N (a ``rank_pattern``); the second half is an ``EXISTS`` over ``adapter_modules``,
which without this index scans every module row (seconds at 100,000 adapters).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 04:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_adapter_modules_rank", "adapter_modules", ["rank", "adapter_id"])


def downgrade() -> None:
    op.drop_index("ix_adapter_modules_rank", table_name="adapter_modules")
