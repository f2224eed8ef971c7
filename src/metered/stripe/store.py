"""The SQL of the Stripe integration, rendered once for the ledger's dialect and driver.

Statements run inside the ledger's own transactions (see :mod:`metered.stripe.handlers`), so
an event's id, its mirror rows and the ledger changes it causes commit together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from metered._sql import Dialect, ParamStyle, Stmt, render

SUBSCRIPTION_COLUMNS = (
    "subscription",
    "subject",
    "customer",
    "plan",
    "cancel_at_period_end",
    "plan_version",
    "status",
    "status_version",
    "period_start",
    "period_end",
    "period_version",
)
PURCHASE_COLUMNS = ("session", "subject", "feature", "units", "status", "refunded_units")


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    """A mirrored subscription: the last known plan, status and period, each with its version."""

    subscription: str
    subject: str | None
    customer: str | None
    plan: str | None
    cancel_at_period_end: bool
    plan_version: int
    status: str | None
    status_version: int
    period_start: int | None
    period_end: int | None
    period_version: int

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> SubscriptionRow:
        data = dict(zip(SUBSCRIPTION_COLUMNS, row))
        data["cancel_at_period_end"] = bool(data["cancel_at_period_end"])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class PurchaseRow:
    session: str
    subject: str
    feature: str
    units: int
    status: str
    refunded_units: int


def lock_key(subject: str) -> int:
    """A stable signed 64-bit key for a per-subject advisory lock."""
    return int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "big", signed=True)


class StripeStatements:
    """Every statement :mod:`metered.stripe` runs, for one dialect and parameter style."""

    def __init__(self, dialect: Dialect, style: ParamStyle) -> None:
        pg = dialect == "postgresql"
        lock = " FOR UPDATE" if pg else ""

        def r(sql: str) -> Stmt:
            return render(sql, style)

        self.subject_lock: Stmt | None = (
            r("SELECT pg_advisory_xact_lock(:lock_key)") if pg else None
        )

        self.event_claim = r(
            "INSERT INTO metered_stripe_events (event_id, type, created, subject, outcome,"
            " processed_at) VALUES (:event_id, :type, :created, NULL, 'processing', :now)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
        )
        self.event_finish = r(
            "UPDATE metered_stripe_events SET outcome = :outcome, subject = :subject"
            " WHERE event_id = :event_id"
        )
        self.event_seen = r("SELECT outcome FROM metered_stripe_events WHERE event_id = :event_id")
        self.events_prune = r("DELETE FROM metered_stripe_events WHERE processed_at < :before")

        self.customer_get = r(
            "SELECT subject, deleted FROM metered_stripe_customers"
            f" WHERE customer = :customer{lock}"
        )
        self.customer_link = r(
            "INSERT INTO metered_stripe_customers (customer, subject, deleted, created_at,"
            " updated_at) VALUES (:customer, :subject, :deleted, :now, :now)"
            " ON CONFLICT (customer) DO UPDATE SET subject = excluded.subject,"
            " updated_at = excluded.updated_at"
        )
        self.customer_delete = r(
            "UPDATE metered_stripe_customers SET deleted = :deleted, updated_at = :now"
            " WHERE customer = :customer"
        )
        self.customer_of_subject = r(
            "SELECT customer FROM metered_stripe_customers WHERE subject = :subject"
            " AND NOT deleted ORDER BY updated_at DESC LIMIT 1"
        )

        columns = ", ".join(SUBSCRIPTION_COLUMNS)
        self.subscription_get = r(
            f"SELECT {columns} FROM metered_stripe_subscriptions"
            f" WHERE subscription = :subscription{lock}"
        )
        self.subscription_put = r(
            f"INSERT INTO metered_stripe_subscriptions ({columns}, event_id, updated_at)"
            f" VALUES ({', '.join(':' + c for c in SUBSCRIPTION_COLUMNS)}, :event_id, :now)"
            " ON CONFLICT (subscription) DO UPDATE SET "
            + ", ".join(
                f"{c} = excluded.{c}" for c in (*SUBSCRIPTION_COLUMNS[1:], "event_id", "updated_at")
            )
        )
        self.subscriptions_of_subject = r(
            f"SELECT {columns} FROM metered_stripe_subscriptions WHERE subject = :subject"
        )
        self.subscriptions_of_customer = r(
            f"SELECT {columns} FROM metered_stripe_subscriptions WHERE customer = :customer"
        )

        purchase = ", ".join(PURCHASE_COLUMNS)
        self.purchase_get = r(
            f"SELECT {purchase} FROM metered_stripe_purchases WHERE session = :session{lock}"
        )
        self.purchase_by_payment_intent = r(
            f"SELECT {purchase} FROM metered_stripe_purchases"
            f" WHERE payment_intent = :payment_intent{lock}"
        )
        self.purchase_put = r(
            "INSERT INTO metered_stripe_purchases (session, subject, feature, units,"
            " payment_intent, status, refunded_units, created_at, updated_at)"
            " VALUES (:session, :subject, :feature, :units, :payment_intent, :status,"
            " :refunded_units, :now, :now)"
            " ON CONFLICT (session) DO UPDATE SET status = excluded.status,"
            " refunded_units = excluded.refunded_units,"
            " payment_intent = COALESCE(excluded.payment_intent,"
            " metered_stripe_purchases.payment_intent), updated_at = excluded.updated_at"
        )

        # Usage export: the operations table is the outbox (see metered.schema).
        self.export_pending = r(
            "SELECT o.subject, o.id, o.meter, o.charged, COALESCE(o.settled_at, o.created_at),"
            " (SELECT c.customer FROM metered_stripe_customers c"
            "  WHERE c.subject = o.subject AND NOT c.deleted"
            "  ORDER BY c.updated_at DESC LIMIT 1)"
            " FROM metered_operations o"
            " WHERE o.meter IS NOT NULL AND o.exported_at IS NULL AND o.state = 'committed'"
            " AND (o.id > :after_id OR (o.id = :after_id AND o.subject > :after_subject))"
            " ORDER BY o.id, o.subject LIMIT :limit"
        )
        self.export_mark = r(
            "UPDATE metered_operations SET exported_at = :now"
            " WHERE subject = :subject AND id = :id AND exported_at IS NULL"
        )
        self.issue_put = r(
            "INSERT INTO metered_stripe_export_issues (subject, id, reason, attempts, detail,"
            " updated_at) VALUES (:subject, :id, :reason, 1, :detail, :now)"
            " ON CONFLICT (subject, id) DO UPDATE SET reason = excluded.reason,"
            " attempts = metered_stripe_export_issues.attempts + 1,"
            " detail = excluded.detail, updated_at = excluded.updated_at"
        )
        self.issue_clear = r(
            "DELETE FROM metered_stripe_export_issues WHERE subject = :subject AND id = :id"
        )
