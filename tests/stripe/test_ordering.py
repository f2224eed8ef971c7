"""Ordering and duplication: Stripe delivers in any order, any number of times.

A realistic history (checkout -> subscription created -> invoice paid -> updated (cancel at
period end) -> updated (plan change) -> renewal -> payment failed -> past_due -> deleted ->
the overdue invoice paid late) is
cut at every point; each prefix is delivered shuffled and with duplicates, many times over
(seeded, so failures reproduce). The final state must always equal

* the state after delivering the same events once each, in order, and
* the state implied by the newest event of each kind (computed here from the history alone).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from stripe_support import (
    DAY,
    MONTH,
    SECRET,
    T0,
    Env,
    checkout_session,
    invoice,
    subscription,
)

from metered._drivers import resolve_url
from metered.clock import ManualClock
from metered.schema import stripe_events, stripe_subscriptions, subjects
from metered.testing import sign_stripe_payload

EXAMPLES = 10  # shuffled deliveries per prefix and generation (a third of it on PostgreSQL)
P1 = (T0 - DAY, T0 - DAY + MONTH)
P2 = (P1[1], P1[1] + MONTH)
P3 = (P2[1], P2[1] + MONTH)
PRICE = {"pro": "price_pro_monthly", "team": "price_team_monthly"}


@dataclass(frozen=True)
class Step:
    """One event of the history, and what it says (None: it says nothing about that)."""

    type: str
    created: int
    plan: str | None = None
    status: str | None = None
    period: tuple[int, int] | None = None
    cancel: bool = False


HISTORY = [
    Step("checkout.session.completed", T0 + 10),
    Step("customer.subscription.created", T0 + 11, "pro", "active", P1),
    Step("invoice.paid", T0 + 12, status="active", period=P1),
    Step("customer.subscription.updated", T0 + 3600, "pro", "active", P1, cancel=True),
    Step("customer.subscription.updated", T0 + 7200, "team", "active", P1),
    Step("customer.subscription.updated", P2[0] + 5, "team", "active", P2),
    Step("invoice.paid", P2[0] + 60, status="active", period=P2),
    Step("invoice.payment_failed", P3[0] + 60, status="past_due"),
    Step("customer.subscription.updated", P3[0] + 61, "team", "past_due", P3),
    Step("customer.subscription.deleted", P3[0] + 5 * DAY, "team", "canceled", P3),
    # The overdue invoice is paid after all: a canceled subscription stays canceled.
    Step("invoice.paid", P3[0] + 6 * DAY, status="active", period=P3),
]


def _events(steps: list[Step], subject: str, generation: str, api_version: str) -> list[bytes]:
    cus, sub = f"cus_{subject}", f"sub_{subject}"
    bodies = []
    for i, step in enumerate(steps):
        if step.type.startswith("checkout."):
            obj = checkout_session(
                "subscription", subject=subject, customer=cus, subscription_id=sub
            )
        elif step.type.startswith("invoice."):
            obj = invoice(
                sub,
                cus,
                PRICE["team"],
                period=step.period or P3,
                generation=generation,
                subject=subject,
                status="paid" if step.type == "invoice.paid" else "open",
            )
        else:
            assert step.plan and step.status and step.period
            obj = subscription(
                sub,
                cus,
                PRICE[step.plan],
                period=step.period,
                generation=generation,
                status=step.status,
                subject=subject,
                cancel_at_period_end=step.cancel,
            )
        event = {
            "id": f"evt_{subject}_{i}",
            "object": "event",
            "api_version": api_version,
            "created": step.created,
            "livemode": False,
            "type": step.type,
            "data": {"object": obj},
        }
        bodies.append(json.dumps(event).encode())
    return bodies


def _version(step: Step) -> tuple[bool, int, int]:
    rank = {"customer.subscription.created": 0, "invoice.paid": 1, "invoice.payment_failed": 1}
    return step.status == "canceled", step.created, rank.get(step.type, 2)


def _implied(steps: list[Step]) -> tuple[str, str, tuple[int, int] | None, bool]:
    """(plan, status, period, cancel_at_period_end) from the newest step saying each."""
    plans = [s for s in steps if s.plan]
    if not plans:
        return "free", "active", None, False
    newest_plan = max(plans, key=_version)
    status = max((s for s in steps if s.status), key=_version).status
    period = max((s for s in steps if s.period), key=_version).period
    if status not in ("active", "trialing", "past_due"):
        return "free", "active", None, False  # on_inactive="default_plan"
    assert status is not None
    return newest_plan.plan or "", status, period, newest_plan.cancel


def _state(engine: Engine, subject: str) -> tuple[Any, ...]:
    """Everything stored about the subject's subscription, minus its own names."""
    drop = {"subject", "subscription", "customer", "event_id", "updated_at", "created_at"}
    with engine.connect() as conn:
        return tuple(
            [
                {k: v for k, v in row._mapping.items() if k not in drop}
                for row in conn.execute(select(table).where(table.c.subject == subject))
            ]
            for table in (subjects, stripe_subscriptions)
        )


def _processed(engine: Engine, subject: str) -> int:
    with engine.connect() as conn:
        query = select(func.count()).where(stripe_events.c.event_id.like(f"evt_{subject}_%"))
        return int(conn.execute(query).scalar_one())


def _deliver(env: Env, bodies: list[bytes]) -> None:
    now = env.clock.now_us() // 1_000_000
    for body in bodies:
        header = sign_stripe_payload(body, SECRET, timestamp=now)
        result = env.billing.handle_webhook(body, header)
        assert result.outcome in ("applied", "duplicate", "stale", "unresolved"), result


@pytest.mark.parametrize("generation", ["basil", "acacia"])
def test_any_order_any_duplicates_same_final_state(
    database_url: str, clock: ManualClock, generation: str
) -> None:
    env = Env("flask", database_url, clock, {}, generation)  # the clock stands still
    engine = create_engine(resolve_url(database_url, asynchronous=False).sqlalchemy_url)
    examples = EXAMPLES if database_url.startswith("sqlite") else EXAMPLES // 3
    api_version = env.events.api_version
    try:
        for cut in range(1, len(HISTORY) + 1):
            steps = HISTORY[:cut]
            reference = f"ref{cut}"
            _deliver(env, _events(steps, reference, generation, api_version))
            expected = _state(engine, reference)

            plan, status, period, cancel = _implied(steps)
            check = env.ledger.check(reference, "api_calls")
            assert (check.plan, check.status) == (plan, status), (cut, check)
            if period is not None:
                row = expected[0][0]
                assert (row["period_start"] // 10**6, row["period_end"] // 10**6) == period
                assert bool(row["cancel_at_period_end"]) == cancel

            for example in range(examples):
                rng = random.Random(f"{generation}-{cut}-{example}")
                subject = f"s{cut}x{example}"
                bodies = _events(steps, subject, generation, api_version)
                deliveries = [b for b in bodies for _ in range(rng.choice((1, 1, 2, 3)))]
                rng.shuffle(deliveries)
                _deliver(env, deliveries)
                assert _state(engine, subject) == expected, (cut, example, deliveries)
                assert _processed(engine, subject) == len(bodies)
    finally:
        engine.dispose()
        env.close()
