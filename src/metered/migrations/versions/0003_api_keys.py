"""API keys of the HTTP server (``metered keys create``), stored hashed.

Revision ID: 0003_api_keys
Revises: 0002_stripe
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_api_keys"
down_revision = "0002_stripe"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metered_api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("name", sa.String(100), nullable=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("metered_api_keys")
