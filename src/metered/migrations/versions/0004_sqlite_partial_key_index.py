"""SQLite: the idempotency-key index holds keyed operations only.

Most metered requests carry no idempotency key, yet each of their operation rows put a
``(subject, NULL)`` entry in the unique key index: one more page written to the WAL per
request for an entry no lookup ever finds (``key = :key`` never matches NULL). The index
becomes partial (``WHERE key IS NOT NULL``). The upserts name no conflict target, so they
work with either index; code from before this revision names ``(subject, key)``, which only
the full index matches, so every process must run the new code before the file is upgraded.
PostgreSQL is unchanged.

Revision ID: 0004_sqlite_partial_key_index
Revises: 0003_api_keys
"""

from __future__ import annotations

from alembic import op

revision = "0004_sqlite_partial_key_index"
down_revision = "0003_api_keys"
branch_labels = None
depends_on = None

_INDEX = 'CREATE UNIQUE INDEX uq_metered_operations_key ON metered_operations (subject, "key")'


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute("DROP INDEX uq_metered_operations_key")
    op.execute(f'{_INDEX} WHERE "key" IS NOT NULL')


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute("DROP INDEX uq_metered_operations_key")
    op.execute(_INDEX)
