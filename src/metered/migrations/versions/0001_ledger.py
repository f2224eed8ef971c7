"""The ledger: subjects, accounts, operations and credits.

Revision ID: 0001_ledger
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_ledger"
down_revision = None
branch_labels = None
depends_on = None


def _bigints(*names: str, nullable: bool = False) -> list[sa.Column]:  # type: ignore[type-arg]
    return [sa.Column(name, sa.BigInteger(), nullable=nullable) for name in names]


def upgrade() -> None:
    op.create_table(
        "metered_subjects",
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("plan", sa.String(100), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("interval_months", sa.Integer(), nullable=False),
        *_bigints("period_anchor", "period_start", "period_end"),
        sa.Column("past_due_since", sa.BigInteger(), nullable=True),
        sa.Column("cancel_at_period_end", sa.Boolean(), nullable=False),
        *_bigints("created_at", "updated_at"),
    )
    op.create_table(
        "metered_accounts",
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("feature", sa.String(100), primary_key=True),
        sa.Column("plan", sa.String(100), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("entitled", sa.Boolean(), nullable=False),
        sa.Column("overage_allowed", sa.Boolean(), nullable=False),
        *_bigints("allowance", "used", "credit", "held", "overage", "period_start", "period_end"),
        sa.Column("access_until", sa.BigInteger(), nullable=True),
        sa.Column("recheck_at", sa.BigInteger(), nullable=False),
        sa.Column("meter", sa.String(100), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "metered_operations",
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("key", sa.String(255), nullable=True),
        sa.Column("released_key", sa.String(255), nullable=True),
        sa.Column("feature", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("charged", sa.BigInteger(), nullable=True),
        *_bigints("from_allowance", "from_credit", "overage"),
        sa.Column("remaining_after", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        *_bigints("expires_at", "settled_at", nullable=True),
        sa.Column("meter", sa.String(100), nullable=True),
        sa.Column("exported_at", sa.BigInteger(), nullable=True),
    )
    op.create_index(
        "uq_metered_operations_key", "metered_operations", ["subject", "key"], unique=True
    )
    held = sa.text("state = 'held'")
    op.create_index(
        "ix_metered_operations_held",
        "metered_operations",
        ["subject", "feature"],
        postgresql_where=held,
        sqlite_where=held,
    )
    pending = sa.text("meter IS NOT NULL AND exported_at IS NULL")
    op.create_index(
        "ix_metered_operations_export",
        "metered_operations",
        ["id"],
        postgresql_where=pending,
        sqlite_where=pending,
    )
    op.create_table(
        "metered_credits",
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("feature", sa.String(100), nullable=False),
        *_bigints("units", "remaining"),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_metered_credits_feature", "metered_credits", ["subject", "feature"])


def downgrade() -> None:
    for table in ("metered_credits", "metered_operations", "metered_accounts", "metered_subjects"):
        op.drop_table(table)
