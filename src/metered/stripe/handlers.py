"""Stripe events turned into ledger state, as sans-IO operations (see :mod:`metered._core`).

Each public method here returns one operation generator that runs as **one transaction**:
the event id is claimed under its primary key, the mirror rows change, and the ledger is
updated through the core's transaction bodies (``assign_plan_in_tx``, ``grant_in_tx``,
``revoke_in_tx``), so either all of it commits or none of it does.

Ordering. Stripe does not order deliveries, so subscription state is kept per subscription
in three groups of fields (plan, status, period), each stamped with the *version* of the
event that last wrote it:
``(terminal, event.created, precedence)``. A change is taken only if its version is newer
than the group's; a terminal status (``canceled``, ``incomplete_expired``) outranks every
non-terminal one, since Stripe never revives such a subscription. Merging is therefore
order-independent: any permutation of the same deliveries ends in the same rows. The
subject's plan is then *projected* from the best of its subscriptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from typing import Literal

from metered import _core
from metered.errors import InvalidInput
from metered.stripe.config import CreditPack, Settings
from metered.stripe.shapes import (
    Item,
    Obj,
    expanded,
    invoice_period,
    invoice_subscription,
    invoice_subscription_metadata,
    metadata,
    ref,
    subscription_items,
    subscription_period,
)
from metered.stripe.signature import Event
from metered.stripe.store import (
    PurchaseRow,
    StripeStatements,
    SubscriptionRow,
    lock_key,
)
from metered.validation import subject as check_subject

logger = logging.getLogger("metered.stripe")

Outcome = Literal["applied", "duplicate", "ignored", "stale", "unresolved"]
Kind = Literal["session", "subscription", "invoice", "charge", "customer", "entitlements"]

KINDS: dict[str, Kind] = {
    "checkout.session.completed": "session",
    "checkout.session.async_payment_succeeded": "session",
    "checkout.session.async_payment_failed": "session",
    "customer.subscription.created": "subscription",
    "customer.subscription.updated": "subscription",
    "customer.subscription.deleted": "subscription",
    "customer.subscription.paused": "subscription",
    "customer.subscription.resumed": "subscription",
    "invoice.paid": "invoice",
    "invoice.payment_failed": "invoice",
    "charge.refunded": "charge",
    "customer.deleted": "customer",
    "entitlements.active_entitlement_summary.updated": "entitlements",
}
"""The event types metered acts on; every other type is acknowledged and ignored."""

# Precedence of events stamped with the same second: a subscription is created, invoiced,
# updated, deleted. Re-fetched objects are the newest truth of their moment.
_RANK = {"customer.subscription.created": 0, "invoice.paid": 1, "invoice.payment_failed": 1}
_RANK_LAST = 3
_RANK_FETCHED = 7
_TERMINAL = frozenset({"canceled", "incomplete_expired"})
_ACCESS = frozenset({"active", "trialing", "past_due"})
_STATUS_RANK = {"active": 3, "trialing": 3, "past_due": 2}


def version(created: int, rank: int, *, terminal: bool = False) -> int:
    """Order of a change: terminal first, then event time (seconds), then precedence."""
    return (int(terminal) << 50) | (max(created, 0) << 3) | rank


def grant_key(session_id: str) -> str:
    """The ledger key of the credits a checkout session bought (one grant per session)."""
    return f"stripe-checkout-{session_id}"


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """What :meth:`StripeBilling.handle_webhook` did with one delivery."""

    event_id: str
    type: str
    outcome: Outcome
    subject: str | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """An object to apply: from an event payload, or re-fetched from the API just now."""

    event: Event
    obj: Obj
    fetched: bool
    now_s: int

    def version(self, rank: int | None = None, *, terminal: bool = False) -> int:
        if self.fetched:
            return version(self.now_s, _RANK_FETCHED, terminal=terminal)
        rank = _RANK.get(self.event.type, 2) if rank is None else rank
        return version(self.event.created, rank, terminal=terminal)


@dataclass(frozen=True, slots=True)
class Change:
    """What one event says about a subscription (None: it says nothing about that group)."""

    version: int
    plan: str | None = None
    cancel_at_period_end: bool = False
    status: str | None = None
    period: tuple[int, int] | None = None  # microseconds


def merge(
    old: SubscriptionRow | None,
    subscription: str,
    subject: str | None,
    customer: str | None,
    change: Change | None,
) -> SubscriptionRow:
    """``old`` with every group ``change`` is newer for, and a missing subject/customer filled.

    Each group (plan with ``cancel_at_period_end``, status, period) is its own
    last-writer-wins register, so the result does not depend on the order of the changes.
    """
    row = old or SubscriptionRow(
        subscription, None, None, None, False, -1, None, -1, None, None, -1
    )
    row = replace(row, subject=row.subject or subject, customer=row.customer or customer)
    if change is None:
        return row
    if change.plan is not None and change.version > row.plan_version:
        row = replace(
            row,
            plan=change.plan,
            cancel_at_period_end=change.cancel_at_period_end,
            plan_version=change.version,
        )
    if change.status is not None and change.version > row.status_version:
        row = replace(row, status=change.status, status_version=change.version)
    if change.period is not None and change.version > row.period_version:
        start, end = change.period
        row = replace(row, period_start=start, period_end=end, period_version=change.version)
    return row


def _positive(value: object) -> int:
    """A quantity from metadata or a line item; 1 when absent or not a positive integer."""
    text = str(value) if value is not None else ""
    return int(text) if text.isdigit() and int(text) > 0 else 1


def _to_us(span: tuple[int, int] | None) -> tuple[int, int] | None:
    return (span[0] * 1_000_000, span[1] * 1_000_000) if span else None


Handler = Callable[[Source], _core.Op]


class Applier:
    """Applies Stripe objects to the ledger; every method yields statements of one transaction."""

    def __init__(self, ctx: _core.Context, sql: StripeStatements, settings: Settings) -> None:
        self.ctx = ctx
        self.sql = sql
        self.settings = settings
        self._handlers: dict[Kind, Handler] = {
            "session": self._session,
            "subscription": self._subscription,
            "invoice": self._invoice,
            "charge": self._charge,
            "customer": self._customer_deleted,
            "entitlements": self._entitlements,
        }

    # ------------------------------------------------------------------- transactions

    def event(self, event: Event, obj: Obj, kind: Kind, *, fetched: bool) -> _core.Op:
        """Claim ``event.id`` and apply ``obj`` with the handler for ``kind``, atomically."""
        stmts, sql = self.ctx.stmts, self.sql
        now = self.ctx.clock.now_us()
        yield stmts.begin, {}
        claimed = yield (
            sql.event_claim,
            {"event_id": event.id, "type": event.type, "created": event.created, "now": now},
        )
        if not claimed:
            yield stmts.commit_tx, {}
            return WebhookResult(event.id, event.type, "duplicate")
        outcome, subject = yield from self._handlers[kind](
            Source(event, obj, fetched, now // 1_000_000)
        )
        yield (
            sql.event_finish,
            {"event_id": event.id, "outcome": outcome, "subject": subject},
        )
        yield stmts.commit_tx, {}
        return WebhookResult(event.id, event.type, outcome, subject)

    def fetched_session(self, session: Obj) -> _core.Op:
        """Apply a checkout session re-fetched from the API (no event id to record)."""
        now_s = self.ctx.clock.now_us() // 1_000_000
        event = Event(f"sync:{session.get('id')}", "checkout.session.completed", now_s, None, {})
        body = self._session(Source(event, session, True, now_s))
        return (yield from _core.transaction(self.ctx, body))

    def seen(self, event_id: str) -> _core.Op:
        """Whether an event was already processed (a cheap pre-check before re-fetching)."""
        rows = yield self.sql.event_seen, {"event_id": event_id}
        return bool(rows)

    def prune(self, before_us: int) -> _core.Op:
        yield self.sql.events_prune, {"before": before_us}
        return None

    def customer_of(self, subject: str) -> _core.Op:
        rows = yield self.sql.customer_of_subject, {"subject": subject}
        return rows[0][0] if rows else None

    # ------------------------------------------------------------------- lookups

    @staticmethod
    def _named_subject(value: object) -> str | None:
        """A subject named by Stripe data, if it is a valid one (else it is logged and None)."""
        if value is None or value == "":
            return None
        try:
            return check_subject(value)
        except InvalidInput:
            logger.warning("Stripe data names an invalid subject %r; ignored", value)
            return None

    def _customer_subject(self, customer: str | None) -> _core.Op:
        if customer is None:
            return None
        rows = yield self.sql.customer_get, {"customer": customer}
        return rows[0][0] if rows else None

    def _link(self, customer: str, subject: str) -> _core.Op:
        """Link a Stripe customer to the subject it pays for; True if that changed anything."""
        rows = yield self.sql.customer_get, {"customer": customer}
        if rows and rows[0][0] == subject:
            return False
        if rows:
            logger.warning(
                "Stripe customer %s moves from subject %r to %r", customer, rows[0][0], subject
            )
        now = self.ctx.clock.now_us()
        params = {"customer": customer, "subject": subject, "deleted": False, "now": now}
        yield self.sql.customer_link, params
        return True

    def _subscription_row(self, subscription: str) -> _core.Op:
        rows = yield self.sql.subscription_get, {"subscription": subscription}
        return SubscriptionRow.from_row(rows[0]) if rows else None

    def _plan_of(self, subscription: Obj) -> tuple[str | None, Item | None]:
        """The configured plan the subscription's items map to (by price id or lookup key)."""
        items = subscription_items(subscription)
        for item in items:
            for name in item.price_names:
                if (plan := self.settings.catalog.by_price.get(name)) is not None:
                    return plan.name, item
        names = sorted({n for item in items for n in item.price_names})
        logger.warning(
            "Stripe subscription %s has no price mapped to a plan (%s); plan left unchanged",
            subscription.get("id"),
            ", ".join(names) or "no items",
        )
        return None, None

    # ------------------------------------------------------------------- projection

    def _store(self, old: SubscriptionRow | None, new: SubscriptionRow, event_id: str) -> _core.Op:
        """Write ``new`` if it differs from ``old``; project its subject. Returns an outcome."""
        if new == old:
            return "stale", new.subject
        params = {**asdict(new), "event_id": event_id, "now": self.ctx.clock.now_us()}
        yield self.sql.subscription_put, params
        if new.subject is None:
            logger.warning(
                "Stripe subscription %s: no subject yet (no metadata %r, unknown customer %s);"
                " its state is kept and applied once the customer is linked",
                new.subscription,
                self.settings.metadata_key,
                new.customer,
            )
            return "unresolved", None
        yield from self._project(new.subject)
        return "applied", new.subject

    def _project(self, subject: str) -> _core.Op:
        """Set the subject's plan from the best of its Stripe subscriptions."""
        sql, catalog = self.sql, self.settings.catalog
        if sql.subject_lock is not None:  # serialise projections of one subject (PostgreSQL)
            yield sql.subject_lock, {"lock_key": lock_key(subject)}
        rows = yield sql.subscriptions_of_subject, {"subject": subject}
        candidates = [
            row
            for row in map(SubscriptionRow.from_row, rows)
            if row.plan in catalog.plans and row.status in _core.STATUSES
        ]
        if not candidates:
            return None
        best = max(
            candidates,
            key=lambda r: (
                _STATUS_RANK.get(r.status or "", 0),
                r.status_version,
                r.plan_version,
                r.subscription,  # a total order: the same rows always give the same answer
            ),
        )
        assert best.plan is not None and best.status is not None
        if (
            best.status not in _ACCESS
            and self.settings.on_inactive == "default_plan"
            and catalog.default_plan is not None
        ):
            default = catalog.plans[catalog.default_plan]
            yield from _core.assign_plan_in_tx(
                self.ctx, subject, default, "active", None, None, False
            )
            return None
        yield from _core.assign_plan_in_tx(
            self.ctx,
            subject,
            catalog.plans[best.plan],
            best.status,
            best.period_start,
            best.period_end,
            best.cancel_at_period_end,
        )
        return None

    # ------------------------------------------------------------------- handlers

    def _subscription_change(self, sub: Obj, source: Source) -> Change | None:
        """What a subscription object says; None if its status is not one metered knows."""
        status = sub.get("status")
        if source.event.type == "customer.subscription.deleted" and status not in _TERMINAL:
            status = "canceled"
        if status not in _core.STATUSES:
            logger.warning("Stripe subscription %s has unknown status %r", sub.get("id"), status)
            return None
        terminal = status in _TERMINAL
        plan, item = self._plan_of(sub)
        return Change(
            version=source.version(_RANK_LAST if terminal else None, terminal=terminal),
            plan=plan,
            cancel_at_period_end=bool(sub.get("cancel_at_period_end")),
            status=status,
            period=_to_us(subscription_period(sub, item)),
        )

    def _subscription(self, source: Source) -> _core.Op:
        sub = source.obj
        sub_id = ref(sub.get("id"))
        if sub_id is None:
            return "ignored", None
        customer = ref(sub.get("customer"))
        old = yield from self._subscription_row(sub_id)
        subject = self._named_subject(metadata(sub).get(self.settings.metadata_key))
        if subject is None and (old is None or old.subject is None):
            subject = yield from self._customer_subject(customer)
        change = self._subscription_change(sub, source)
        if change is None:
            return "ignored", subject
        new = merge(old, sub_id, subject, customer, change)
        return (yield from self._store(old, new, source.event.id))

    def _invoice(self, source: Source) -> _core.Op:
        invoice = source.obj
        sub_id = invoice_subscription(invoice)
        if sub_id is None:
            return "ignored", None  # not a subscription invoice
        customer = ref(invoice.get("customer"))
        old = yield from self._subscription_row(sub_id)
        subject = self._named_subject(
            invoice_subscription_metadata(invoice).get(self.settings.metadata_key)
        )
        if subject is None and (old is None or old.subject is None):
            subject = yield from self._customer_subject(customer)
        if source.event.type == "invoice.paid":
            period = _to_us(invoice_period(invoice))
            change = Change(source.version(), status="active", period=period)
        else:
            first = invoice.get("billing_reason") == "subscription_create"
            change = Change(source.version(), status="incomplete" if first else "past_due")
        new = merge(old, sub_id, subject, customer, change)
        return (yield from self._store(old, new, source.event.id))

    def _session(self, source: Source) -> _core.Op:
        session = source.obj
        session_id = ref(session.get("id"))
        meta = metadata(session)
        customer = ref(session.get("customer"))
        subject = self._named_subject(session.get("client_reference_id")) or self._named_subject(
            meta.get(self.settings.metadata_key)
        )
        if subject is None:
            subject = yield from self._customer_subject(customer)
        if session_id is None or subject is None:
            logger.warning("Stripe checkout session %s: no subject; ignored", session_id)
            return "unresolved", None
        linked = False
        if customer is not None:
            linked = yield from self._link(customer, subject)
        if session.get("mode") == "subscription":
            sub_ref = session.get("subscription")
            sub_id = ref(sub_ref)
            if sub_id is None:
                return "ignored", subject
            old = yield from self._subscription_row(sub_id)
            sub_obj = expanded(sub_ref)
            change = None
            if sub_obj is not None and source.fetched:  # re-fetched with the subscription
                change = self._subscription_change(sub_obj, source)
            new = merge(old, sub_id, subject, customer, change)
            outcome, _ = yield from self._store(old, new, source.event.id)
            return ("applied" if linked or outcome != "stale" else "ignored"), subject
        if session.get("mode") == "payment":
            return (yield from self._purchase(source, session_id, subject))
        return "ignored", subject

    def _pack_of(self, session: Obj) -> tuple[CreditPack | None, int]:
        """The pack a payment-mode session bought: from metered's metadata, else line items."""
        meta = metadata(session)
        packs = self.settings.packs
        if (pack := packs.get(meta.get("metered_pack", ""))) is not None:
            return pack, _positive(meta.get("metered_quantity"))
        line_items = session.get("line_items")  # present when re-fetched with expand
        items = line_items.get("data") if isinstance(line_items, dict) else None
        for item in items if isinstance(items, list) else []:
            price = item.get("price") if isinstance(item, dict) else None
            lookup_key = price.get("lookup_key") if isinstance(price, dict) else None
            for name in (ref(price), lookup_key):
                if isinstance(name, str) and name in packs:
                    return packs[name], _positive(item.get("quantity"))
        return None, 0

    def _purchase(self, source: Source, session_id: str, subject: str) -> _core.Op:
        session = source.obj
        pack, quantity = self._pack_of(session)
        if pack is None:
            logger.warning("Stripe checkout session %s bought no known credit pack", session_id)
            return "ignored", subject
        rows = yield self.sql.purchase_get, {"session": session_id}
        prior = PurchaseRow(*rows[0]) if rows else None
        if prior is not None and prior.status == "paid":
            return "ignored", subject  # already granted
        units = pack.units * quantity
        if session.get("payment_status") in ("paid", "no_payment_required"):
            status = "paid"
            expires_at = None
            if pack.expires_after is not None:
                created = session.get("created")
                start = created * 1_000_000 if isinstance(created, int) else self.ctx.clock.now_us()
                expires_at = start + pack.expires_after // timedelta(microseconds=1)
            if expires_at is not None and expires_at <= self.ctx.clock.now_us():
                logger.warning(
                    "credits of Stripe checkout %s expired before they arrived", session_id
                )
            else:
                yield from _core.grant_in_tx(
                    self.ctx, subject, pack.feature, units, grant_key(session_id), expires_at
                )
        elif source.event.type == "checkout.session.async_payment_failed":
            status = "failed"
        else:
            status = "pending"  # asynchronous payment method: wait for async_payment_succeeded
        yield (
            self.sql.purchase_put,
            {
                "session": session_id,
                "subject": subject,
                "feature": pack.feature,
                "units": units,
                "payment_intent": ref(session.get("payment_intent")),
                "status": status,
                "refunded_units": prior.refunded_units if prior else 0,
                "now": self.ctx.clock.now_us(),
            },
        )
        return "applied", subject

    def _charge(self, source: Source) -> _core.Op:
        charge = source.obj
        payment_intent = ref(charge.get("payment_intent"))
        if payment_intent is None:
            return "ignored", None
        rows = yield self.sql.purchase_by_payment_intent, {"payment_intent": payment_intent}
        if not rows:
            if self.settings.metadata_key in metadata(charge):
                # A pack bought through metered whose checkout event has not arrived yet:
                # fail so that Stripe retries the refund after the purchase is recorded.
                raise LookupError(f"refund of {payment_intent} before its checkout was applied")
            return "ignored", None
        purchase = PurchaseRow(*rows[0])
        amount, refunded = charge.get("amount"), charge.get("amount_refunded")
        if charge.get("refunded") is True:
            target = purchase.units
        elif isinstance(amount, int) and amount > 0 and isinstance(refunded, int):
            target = min(purchase.units * max(refunded, 0) // amount, purchase.units)
        else:
            return "ignored", purchase.subject
        if target <= purchase.refunded_units:
            return "stale", purchase.subject
        asked = target - purchase.refunded_units
        taken = yield from _core.revoke_in_tx(
            self.ctx, purchase.subject, purchase.feature, grant_key(purchase.session), asked
        )
        if taken < asked:
            logger.info(
                "refund of %s: %d of %d credits were already spent and stay spent",
                payment_intent,
                asked - taken,
                asked,
            )
        yield (
            self.sql.purchase_put,
            {
                **{"session": purchase.session, "subject": purchase.subject},
                **{"feature": purchase.feature, "units": purchase.units},
                "payment_intent": payment_intent,
                "status": purchase.status,
                "refunded_units": target,
                "now": self.ctx.clock.now_us(),
            },
        )
        return "applied", purchase.subject

    def _customer_deleted(self, source: Source) -> _core.Op:
        customer = ref(source.obj.get("id"))
        if customer is None:
            return "ignored", None
        subject = yield from self._customer_subject(customer)
        now = self.ctx.clock.now_us()
        yield self.sql.customer_delete, {"customer": customer, "deleted": True, "now": now}
        rows = yield self.sql.subscriptions_of_customer, {"customer": customer}
        change = Change(source.version(_RANK_LAST, terminal=True), status="canceled")
        outcome: Outcome = "applied" if subject is not None else "ignored"
        for old in map(SubscriptionRow.from_row, rows):
            new = merge(old, old.subscription, None, None, change)
            if new != old:
                outcome, _ = yield from self._store(old, new, source.event.id)
        return outcome, subject

    def _entitlements(self, source: Source) -> _core.Op:
        mapping = self.settings.entitlement_plans
        summary = source.obj
        customer = ref(summary.get("customer"))
        if not mapping or customer is None:
            return "ignored", None
        active: set[str] = set()
        entitlements = summary.get("entitlements")
        data = entitlements.get("data") if isinstance(entitlements, dict) else None
        for entitlement in data if isinstance(data, list) else []:
            feature = entitlement.get("feature") if isinstance(entitlement, dict) else None
            for holder in (entitlement, feature):
                if isinstance(holder, dict) and isinstance(holder.get("lookup_key"), str):
                    active.add(holder["lookup_key"])
        plan = next((plan for key, plan in mapping.items() if key in active), None)
        pseudo = f"entitlements:{customer}"
        old = yield from self._subscription_row(pseudo)
        subject = None
        if old is None or old.subject is None:
            subject = yield from self._customer_subject(customer)
        # Never terminal: entitlements come and go with the customer's subscriptions.
        change = Change(source.version(), plan=plan, status="active" if plan else "canceled")
        new = merge(old, pseudo, subject, customer, change)
        return (yield from self._store(old, new, source.event.id))


__all__ = ["KINDS", "Applier", "Kind", "Outcome", "WebhookResult", "grant_key", "merge"]
