"""The ledger's tables, as SQLAlchemy Core metadata.

Every table is keyed by ``subject`` first: each ledger transaction touches one subject's rows
only, which keeps PostgreSQL fast under many workers and lets the schema be sharded by subject
(Citus, CockroachDB, YugabyteDB). Times are ``BIGINT`` microseconds since the epoch (UTC).

The migrations under ``metered/migrations`` create exactly these tables; a test compares them.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, MetaData, String, Table, text

metadata = MetaData()
_EXPORT_PENDING = "meter IS NOT NULL AND exported_at IS NULL"

subjects = Table(
    "metered_subjects",
    metadata,
    Column("subject", String(255), primary_key=True),
    Column("plan", String(100), nullable=False),
    Column("status", String(32), nullable=False),
    Column("interval_months", Integer, nullable=False),
    Column("period_anchor", BigInteger, nullable=False),
    Column("period_start", BigInteger, nullable=False),
    Column("period_end", BigInteger, nullable=False),
    Column("past_due_since", BigInteger, nullable=True),
    Column("cancel_at_period_end", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# One row per (subject, metered feature): the running balance of the current period, kept so
# that consume/reserve/commit/release are one conditional write. ``recheck_at`` is the earliest
# moment (period end, credit expiry, reservation expiry, plan change) at which the row must be
# normalised before it can be trusted again; the fast path refuses to act past it.
accounts = Table(
    "metered_accounts",
    metadata,
    Column("subject", String(255), primary_key=True),
    Column("feature", String(100), primary_key=True),
    Column("plan", String(100), nullable=False),
    Column("status", String(32), nullable=False),
    Column("entitled", Boolean, nullable=False),
    Column("overage_allowed", Boolean, nullable=False),
    Column("allowance", BigInteger, nullable=False),
    Column("used", BigInteger, nullable=False),
    Column("credit", BigInteger, nullable=False),
    Column("held", BigInteger, nullable=False),
    Column("overage", BigInteger, nullable=False),
    Column("period_start", BigInteger, nullable=False),
    Column("period_end", BigInteger, nullable=False),
    Column("access_until", BigInteger, nullable=True),
    Column("recheck_at", BigInteger, nullable=False),
    Column("meter", String(100), nullable=True),
    Column("updated_at", BigInteger, nullable=False),
)

# The append-only ledger: every consumption, reservation, grant, expiry and period start. Rows
# are never deleted; a reservation's outcome is filled in once when it settles. ``key`` holds
# the idempotency key while it is live (held or committed); a released or expired reservation
# moves it to ``released_key`` so the key can be used again by a retry.
operations = Table(
    "metered_operations",
    metadata,
    Column("subject", String(255), primary_key=True),
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("key", String(255), nullable=True),
    Column("released_key", String(255), nullable=True),
    Column("feature", String(100), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("units", BigInteger, nullable=False),
    Column("charged", BigInteger, nullable=True),
    Column("from_allowance", BigInteger, nullable=False),
    Column("from_credit", BigInteger, nullable=False),
    Column("overage", BigInteger, nullable=False),
    Column("remaining_after", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("settled_at", BigInteger, nullable=True),
    # Usage billed through a Stripe meter: set when the units are committed, in the same
    # statement, so the row itself is the outbox entry; ``exported_at`` marks it sent.
    Column("meter", String(100), nullable=True),
    Column("exported_at", BigInteger, nullable=True),
    # On SQLite only keyed operations are in it (migration 0004): an unkeyed one, most
    # metered requests, writes one index page less. PostgreSQL keeps the full index.
    Index(
        "uq_metered_operations_key",
        "subject",
        "key",
        unique=True,
        sqlite_where=text("key IS NOT NULL"),
    ),
    # Live reservations only (the rows normalisation looks for); a partial index also keeps
    # the planner from using it for key lookups, which belong to the unique index.
    Index(
        "ix_metered_operations_held",
        "subject",
        "feature",
        postgresql_where=text("state = 'held'"),
        sqlite_where=text("state = 'held'"),
    ),
    Index(
        "ix_metered_operations_export",
        "id",
        postgresql_where=text(_EXPORT_PENDING),
        sqlite_where=text(_EXPORT_PENDING),
    ),
)

# Credits from grants, spent after the period allowance, soonest-expiring first. ``remaining``
# is reconciled lazily from the account's ``credit`` total when the account is normalised.
credits = Table(
    "metered_credits",
    metadata,
    Column("subject", String(255), primary_key=True),
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("feature", String(100), nullable=False),
    Column("units", BigInteger, nullable=False),
    Column("remaining", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_metered_credits_feature", "subject", "feature"),
)

# --------------------------------------------------------------------------- Stripe billing
# Written by :mod:`metered.stripe` only (migration 0002_stripe). Times are BIGINT microseconds,
# except ``created`` (Stripe's own event time, in seconds).

# Every Stripe event applied (or deliberately ignored), recorded in the same transaction as its
# state change: the primary key is what makes a duplicate delivery change nothing.
stripe_events = Table(
    "metered_stripe_events",
    metadata,
    Column("event_id", String(255), primary_key=True),
    Column("type", String(100), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("subject", String(255), nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("processed_at", BigInteger, nullable=False),
)

# Which subject a Stripe customer pays for; checkout reuses the newest live customer.
stripe_customers = Table(
    "metered_stripe_customers",
    metadata,
    Column("customer", String(255), primary_key=True),
    Column("subject", String(255), nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Index("ix_metered_stripe_customers_subject", "subject"),
)

# The newest known state of each Stripe subscription (and of each customer's Entitlements
# summary, as a pseudo-subscription ``entitlements:<customer>``). Three groups of fields (plan,
# status, period), each with the version (event time and precedence) that last wrote it,
# merged last-writer-wins so that deliveries in any order end in the same state. The
# subject's plan is projected from the best of its rows.
stripe_subscriptions = Table(
    "metered_stripe_subscriptions",
    metadata,
    Column("subscription", String(255), primary_key=True),
    Column("subject", String(255), nullable=True),
    Column("customer", String(255), nullable=True),
    Column("plan", String(100), nullable=True),
    Column("cancel_at_period_end", Boolean, nullable=False),
    Column("plan_version", BigInteger, nullable=False),
    Column("status", String(32), nullable=True),
    Column("status_version", BigInteger, nullable=False),
    Column("period_start", BigInteger, nullable=True),
    Column("period_end", BigInteger, nullable=True),
    Column("period_version", BigInteger, nullable=False),
    Column("event_id", String(255), nullable=True),
    Column("updated_at", BigInteger, nullable=False),
    Index("ix_metered_stripe_subscriptions_subject", "subject"),
    Index("ix_metered_stripe_subscriptions_customer", "customer"),
)

# Credit packs bought through Checkout (payment mode): what was granted under the grant key
# ``stripe-checkout-<session>``, and how much of it refunds took back.
stripe_purchases = Table(
    "metered_stripe_purchases",
    metadata,
    Column("session", String(255), primary_key=True),
    Column("subject", String(255), nullable=False),
    Column("feature", String(100), nullable=False),
    Column("units", BigInteger, nullable=False),
    Column("payment_intent", String(255), nullable=True),
    Column("status", String(16), nullable=False),
    Column("refunded_units", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Index("ix_metered_stripe_purchases_payment_intent", "payment_intent"),
)

# Usage entries the meter export could not send: ``stale`` (older than Stripe's window; taken
# out of the outbox, never sent) or ``rejected`` (Stripe refused it; still pending, retried).
stripe_export_issues = Table(
    "metered_stripe_export_issues",
    metadata,
    Column("subject", String(255), primary_key=True),
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("reason", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("detail", String(500), nullable=True),
    Column("updated_at", BigInteger, nullable=False),
)

# --------------------------------------------------------------------------- HTTP API keys
# Bearer keys of the HTTP API, ``metered.server`` (migration 0003_api_keys). ``id`` is a key's
# public prefix (``mk_test_<12 chars>``); only the SHA-256 of the whole key is stored. A small
# global table, read once per key and cached: on sharded PostgreSQL make it a reference table.
api_keys = Table(
    "metered_api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("mode", String(8), nullable=False),
    Column("name", String(100), nullable=True),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)
