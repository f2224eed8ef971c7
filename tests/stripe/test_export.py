"""Usage export to Stripe Billing Meters against a fake meter-events endpoint that fails
intermittently: afterwards every entry was accepted exactly once by identifier, nothing was
lost, and nothing older than Stripe's 35-day window was sent."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import stripe
from stripe_support import DAY, MONTH, T0, Env, Request, api_error, checkout_session

from metered.schema import operations
from metered.stripe import ExportReport, UsageEntry

METER_EVENTS = "/v1/billing/meter_events"


@pytest.fixture(params=["flask", "starlette-async"], ids=["sync", "async"])
def endpoint(request: pytest.FixtureRequest) -> str:
    """The export has no endpoint: run it on StripeBilling and on AsyncStripeBilling."""
    return str(request.param)


class MeterEndpoint:
    """Stripe's meter-events endpoint, failing at random: 500s, 429s, dropped connections, and
    answers lost *after* the event was stored. Refuses a second event with an identifier."""

    def __init__(self, seed: int, failure_rate: float = 0.5) -> None:
        self.rng = random.Random(seed)
        self.failure_rate = failure_rate
        self.accepted: dict[str, dict[str, str]] = {}
        self.stored = Counter[str]()
        self.attempts = Counter[str]()
        self.reject: set[str] = set()

    def __call__(self, request: Request, match: Any) -> tuple[int, Any]:
        identifier = request.params["identifier"]
        self.attempts[identifier] += 1
        if request.params["event_name"] in self.reject:
            return api_error(400, "No active meter found for event_name")
        roll = self.rng.random() / self.failure_rate if self.failure_rate else 1.0
        if roll < 0.3:
            return api_error(500, "An unknown error occurred", "api_error")
        if roll < 0.5:
            return api_error(429, "Too many requests", "rate_limit_error")
        if roll < 0.7:
            raise stripe.APIConnectionError("connection reset by peer", should_retry=True)
        if identifier in self.accepted:
            return api_error(400, f"An event already exists with identifier {identifier}.")
        self.accepted[identifier] = dict(request.params)
        self.stored[identifier] += 1
        if roll < 0.9:
            return api_error(502, "Bad gateway", "api_error")  # stored, but the answer is lost
        return 200, {"object": "billing.meter_event", "identifier": identifier, "livemode": False}


def _subscribe(env: Env, subject: str, customer: str | None = "cus") -> None:
    """Give ``subject`` the pro plan (tokens billed through the ``tokens_used`` meter)."""
    from stripe_support import subscription

    if customer is not None:
        session = checkout_session(
            "subscription",
            subject=subject,
            customer=f"{customer}_{subject}",
            subscription_id=f"sub_{subject}",
        )
        env.ok("checkout.session.completed", session)
    obj = subscription(
        f"sub_{subject}",
        f"{customer}_{subject}",
        "price_pro_monthly",
        period=(T0 - DAY, T0 - DAY + MONTH),
        subject=subject,
    )
    env.ok("customer.subscription.created", obj)


def _use(env: Env, subject: str) -> int:
    """Usage through every path that commits: consume, reserve+commit (also for 0 units)."""
    ledger = env.ledger
    total = 0
    for units in (5, 12, 7):
        assert ledger.consume(subject, units, feature="tokens").ok
        total += units
    hold = ledger.reserve(subject, 40, feature="tokens")
    ledger.commit(hold, units=30)
    ledger.commit(ledger.reserve(subject, 3, feature="tokens"), units=0)
    ledger.release(ledger.reserve(subject, 9, feature="tokens"))  # released: nothing to bill
    assert ledger.consume(subject, 4, feature="api_calls").ok  # not a metered-export feature
    return total + 30


def _pending(env: Env) -> list[tuple[Any, ...]]:
    names = [c.name for c in operations.columns]
    rows = [dict(zip(names, row)) for row in env.rows("metered_operations")]
    return [r for r in rows if r["meter"] is not None and r["exported_at"] is None]


def _export_until_done(env: Env, runs: int = 20) -> list[ExportReport]:
    reports = []
    for _ in range(runs):
        report = env.billing.export_usage(batch_size=4)
        reports.append(report)
        if report.interrupted is None and not report.rejected and not report.no_customer:
            break
    return reports


def test_every_entry_sent_exactly_once_despite_failures(env: Env) -> None:
    meter = MeterEndpoint(seed=7)
    env.fake.route("post", METER_EVENTS, meter)
    expected_units = {}
    for subject in ("alice", "bob", "carol"):
        _subscribe(env, subject)
        expected_units[subject] = _use(env, subject)

    reports = _export_until_done(env)
    assert reports[-1].complete
    assert _pending(env) == []
    sent = [entry for report in reports for entry in report.sent]
    # Every entry once, by identifier; Stripe holds each exactly once; nothing else was sent.
    assert len(sent) == len({e.identifier for e in sent}) == 3 * 4
    assert set(meter.accepted) == {e.identifier for e in sent}
    assert set(meter.stored.values()) == {1}
    assert sum(meter.attempts.values()) > len(sent)  # the failures did happen
    for subject, units in expected_units.items():
        events = [
            p
            for p in meter.accepted.values()
            if p["payload[stripe_customer_id]"] == f"cus_{subject}"
        ]
        assert sum(int(p["payload[value]"]) for p in events) == units
        assert {p["event_name"] for p in events} == {"tokens_used"}
        assert {int(p["timestamp"]) for p in events} == {T0}
    # Nothing left: another run sends nothing.
    attempts = sum(meter.attempts.values())
    assert env.billing.export_usage().sent == []
    assert sum(meter.attempts.values()) == attempts


def test_entries_older_than_the_window_are_reported_not_sent(env: Env) -> None:
    meter = MeterEndpoint(seed=1, failure_rate=0)
    env.fake.route("post", METER_EVENTS, meter)
    _subscribe(env, "dave")
    env.ledger.consume("dave", 10, feature="tokens")
    env.ledger.consume("dave", 11, feature="tokens")
    env.clock.advance(days=36)  # the exporter was down for over a month
    env.ledger.consume("dave", 12, feature="tokens")
    report = env.billing.export_usage()
    assert [e.units for e in report.stale] == [10, 11]
    assert [e.units for e in report.sent] == [12]
    assert [p["payload[value]"] for p in meter.accepted.values()] == ["12"]
    assert _pending(env) == []
    issues = env.rows("metered_stripe_export_issues")
    assert sorted((row[2], row[3]) for row in issues) == [("stale", 1), ("stale", 1)]
    assert env.billing.export_usage().stale == []  # reported once, then out of the outbox


def test_no_customer_and_rejected_entries_stay_pending(env: Env) -> None:
    meter = MeterEndpoint(seed=3, failure_rate=0)
    env.fake.route("post", METER_EVENTS, meter)
    _subscribe(env, "erin", customer=None)  # subscribed, but no customer linked yet
    env.ledger.consume("erin", 8, feature="tokens")
    report = env.billing.export_usage()
    assert [e.units for e in report.no_customer] == [8] and report.sent == []
    assert len(_pending(env)) == 1

    env.ok(
        "checkout.session.completed",
        checkout_session(
            "subscription", subject="erin", customer="cus_erin", subscription_id="sub_erin"
        ),
    )
    meter.reject.add("tokens_used")  # e.g. the meter was archived in Stripe
    for attempt in (1, 2):
        report = env.billing.export_usage()
        assert [(e.units, why) for e, why in report.rejected] == [
            (8, "No active meter found for event_name")
        ]
        assert [(r[2], r[3]) for r in env.rows("metered_stripe_export_issues")] == [
            ("rejected", attempt)
        ]
    meter.reject.clear()
    report = env.billing.export_usage()
    assert [e.units for e in report.sent] == [8] and report.complete
    assert env.rows("metered_stripe_export_issues") == []
    assert _pending(env) == []


def test_stripe_down_interrupts_the_run_and_loses_nothing(env: Env) -> None:
    meter = MeterEndpoint(seed=5, failure_rate=0)
    env.fake.route("post", METER_EVENTS, lambda r, m: api_error(503, "down", "api_error"))
    _subscribe(env, "frank")
    _use(env, "frank")
    report = env.billing.export_usage()
    assert report.interrupted is not None and "down" in report.interrupted
    assert report.sent == [] and len(_pending(env)) == 4
    # 1 try + export_retries (4) retries of the first entry, then the run stops.
    assert len(env.fake.calls("post", METER_EVENTS)) == 5
    env.fake.route("post", METER_EVENTS, meter)  # later routes do not win: replace the list
    env.fake._routes = env.fake._routes[-1:]
    assert len(env.billing.export_usage().sent) == 4
    assert _pending(env) == []


def test_authentication_errors_are_raised(env: Env) -> None:
    env.fake.route("post", METER_EVENTS, lambda r, m: api_error(401, "Invalid API Key"))
    _subscribe(env, "gina")
    env.ledger.consume("gina", 1, feature="tokens")
    with pytest.raises(stripe.AuthenticationError):
        env.billing.export_usage()
    assert len(_pending(env)) == 1


def test_identifiers_are_stable_and_short() -> None:
    entry = UsageEntry("x" * 255, 2**62, "tokens_used", 5, T0, "cus_1")
    again = UsageEntry("x" * 255, 2**62, "tokens_used", 9, T0 + 5, "cus_2")
    other = UsageEntry("y" * 255, 2**62, "tokens_used", 5, T0, "cus_1")
    assert entry.identifier == again.identifier != other.identifier
    assert len(entry.identifier) <= 100
