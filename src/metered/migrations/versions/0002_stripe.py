"""Stripe billing: processed events, customer links, subscription state, purchases, export issues.

Revision ID: 0002_stripe
Revises: 0001_ledger
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_stripe"
down_revision = "0001_ledger"
branch_labels = None
depends_on = None

_TABLES = (
    "metered_stripe_export_issues",
    "metered_stripe_purchases",
    "metered_stripe_subscriptions",
    "metered_stripe_customers",
    "metered_stripe_events",
)


def _bigint(name: str, *, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "metered_stripe_events",
        sa.Column("event_id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(100), nullable=False),
        _bigint("created"),
        sa.Column("subject", sa.String(255), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        _bigint("processed_at"),
    )
    op.create_table(
        "metered_stripe_customers",
        sa.Column("customer", sa.String(255), primary_key=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        _bigint("created_at"),
        _bigint("updated_at"),
    )
    op.create_index("ix_metered_stripe_customers_subject", "metered_stripe_customers", ["subject"])
    op.create_table(
        "metered_stripe_subscriptions",
        sa.Column("subscription", sa.String(255), primary_key=True),
        sa.Column("subject", sa.String(255), nullable=True),
        sa.Column("customer", sa.String(255), nullable=True),
        sa.Column("plan", sa.String(100), nullable=True),
        sa.Column("cancel_at_period_end", sa.Boolean(), nullable=False),
        _bigint("plan_version"),
        sa.Column("status", sa.String(32), nullable=True),
        _bigint("status_version"),
        _bigint("period_start", nullable=True),
        _bigint("period_end", nullable=True),
        _bigint("period_version"),
        sa.Column("event_id", sa.String(255), nullable=True),
        _bigint("updated_at"),
    )
    op.create_index(
        "ix_metered_stripe_subscriptions_subject", "metered_stripe_subscriptions", ["subject"]
    )
    op.create_index(
        "ix_metered_stripe_subscriptions_customer", "metered_stripe_subscriptions", ["customer"]
    )
    op.create_table(
        "metered_stripe_purchases",
        sa.Column("session", sa.String(255), primary_key=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("feature", sa.String(100), nullable=False),
        _bigint("units"),
        sa.Column("payment_intent", sa.String(255), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        _bigint("refunded_units"),
        _bigint("created_at"),
        _bigint("updated_at"),
    )
    op.create_index(
        "ix_metered_stripe_purchases_payment_intent",
        "metered_stripe_purchases",
        ["payment_intent"],
    )
    op.create_table(
        "metered_stripe_export_issues",
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("detail", sa.String(500), nullable=True),
        _bigint("updated_at"),
    )


def downgrade() -> None:
    for table in _TABLES:
        op.drop_table(table)
