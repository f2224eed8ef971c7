"""SQLite: unit operations keep their account row up to date through triggers.

A unit operation writes its operation row and updates its account's running balance. On
PostgreSQL both writes are one statement (data-modifying CTEs). SQLite has none, so the ledger
ran the account update as a second statement inside ``BEGIN IMMEDIATE``: four statements per
operation. With these triggers the operation's own write updates the account too, so an
operation is one autocommit statement, as atomic as the transaction it replaces.

The triggers fire only for the writes of the unit operations: a consume (committed on insert),
a reservation (held on insert), and a reservation leaving ``held`` for ``committed`` or
``released``. History rows (``applied``) and expiry (``held`` to ``expired``, whose account is
recomputed by normalisation) leave the account alone. PostgreSQL is unchanged.

Revision ID: 0004_sqlite_account_triggers
Revises: 0003_api_keys
"""

from __future__ import annotations

from alembic import op

revision = "0004_sqlite_account_triggers"
down_revision = "0003_api_keys"
branch_labels = None
depends_on = None

_TRIGGERS = {
    "metered_consume_applied": """
        AFTER INSERT ON metered_operations
        WHEN NEW.kind = 'consume' AND NEW.state = 'committed'
        BEGIN
            UPDATE metered_accounts
            SET used = used + NEW.from_allowance, credit = credit - NEW.from_credit,
                overage = overage + NEW.overage, updated_at = NEW.created_at
            WHERE subject = NEW.subject AND feature = NEW.feature;
        END""",
    "metered_reserve_applied": """
        AFTER INSERT ON metered_operations
        WHEN NEW.kind = 'reserve' AND NEW.state = 'held'
        BEGIN
            UPDATE metered_accounts
            SET held = held + NEW.units, recheck_at = MIN(recheck_at, NEW.expires_at),
                updated_at = NEW.created_at
            WHERE subject = NEW.subject AND feature = NEW.feature;
        END""",
    "metered_reservation_settled": """
        AFTER UPDATE OF state ON metered_operations
        WHEN OLD.state = 'held' AND NEW.state IN ('committed', 'released')
        BEGIN
            UPDATE metered_accounts
            SET used = used + NEW.from_allowance, credit = credit - NEW.from_credit,
                overage = overage + NEW.overage, held = held - OLD.units,
                updated_at = NEW.settled_at
            WHERE subject = NEW.subject AND feature = NEW.feature;
        END""",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for name, body in _TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {body}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for name in _TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
