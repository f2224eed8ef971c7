"""The ledger against a simple in-memory model of its rules, over random operation sequences.

Hypothesis drives grant / reserve / commit (with a random final amount) / release / consume /
assign_plan and clock moves (seconds to weeks, and exact hits on the next reservation TTL,
credit expiry, period end or end of a past-due grace period, give or take 1 microsecond)
against a real ledger on a :class:`ManualClock`, and checks every result, and after every
step the balance, ``check()`` and the history, against :class:`Model`.

The model is written from the rules, not from the implementation, and is eager where the
ledger is lazy (it expires holds and credits and rolls periods the moment the clock moves):

* spendable = period allowance left + unexpired credits - units held by live reservations;
* units are taken from the period allowance first, then from credits, soonest-expiring
  first (credits without expiry last), then as overage where the plan allows it;
* a reservation that outlives its TTL gives its units back and frees its key;
* at a new billing period (calendar months from the anchor) the allowance is whole again;
  credits survive until they expire; assigning another plan starts a new period now;
* a key replays its committed operation, is "in progress" while its reservation is held,
  and is an error when reused for something else.

Each example runs on a fresh subject of a database created once per test, with the clock
set back to START, so examples are independent without rebuilding the schema.
"""

from __future__ import annotations

import asyncio
import calendar
import itertools
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from metered import (
    AsyncLedger,
    Feature,
    IdempotencyKeyMismatch,
    InvalidInput,
    Ledger,
    ManualClock,
    OperationInProgress,
    Plan,
    Reservation,
    ReservationError,
    ReservationExpired,
    ReservationSettled,
)

UTC = timezone.utc
START = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)  # day 31: periods clamp to Feb 28, ...
US = 1_000_000
DAY = 86_400
GRACE = 3 * DAY * US  # the ledger's default past_due grace
FEATURE = "api_calls"

# name: (allowance, overage allowed, interval in months)
PLAN_SPECS: dict[str, tuple[int, bool, int]] = {
    "free": (20, False, 1),
    "pro": (60, False, 1),
    "metered": (10, True, 1),
    "quarterly": (40, False, 3),
}
DEFAULT_PLAN = "free"
PLANS = [
    Plan(name, features={FEATURE: Feature(units=units, overage=overage)}, interval_months=months)
    for name, (units, overage, months) in PLAN_SPECS.items()
]
STATUSES = st.sampled_from(["active"] * 4 + ["trialing", "past_due", "canceled", "unpaid"])
KEYS = st.sampled_from([None, None, None, "new", "new", "k1", "k2"])
"""No key, a fresh key, or one of two keys every kind of operation competes for."""
UNITS = st.integers(1, 12)
TTLS = st.sampled_from([1, 60, 3600, DAY, 3 * DAY, 7 * DAY, 7 * DAY])


def to_us(when: datetime) -> int:
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


# Absolute credit expiries (a retried grant must name the same expiry to replay).
EXPIRIES = [None, *(to_us(START) + d * DAY * US for d in (1, 2, 20, 45, 90, 200, 400))]


def months_later(anchor_us: int, months: int) -> int:
    """``anchor`` plus whole calendar months, the day clamped to the month's length."""
    anchor = from_us(anchor_us)
    year, month = divmod(anchor.month - 1 + months, 12)
    year += anchor.year
    day = min(anchor.day, calendar.monthrange(year, month + 1)[1])
    return to_us(anchor.replace(year=year, month=month + 1, day=day))


# --------------------------------------------------------------------------- the model


@dataclass
class Op:
    """A consume or a reservation, as the model sees it."""

    kind: str
    key: str | None
    units: int
    state: str  # committed | held | released | expired
    expires_at: int | None = None
    id: int | None = None
    charged: int | None = None
    remaining_after: int = 0
    split: tuple[int, int, int] = (0, 0, 0)  # allowance, credit, overage


@dataclass
class Grant:
    key: str | None
    units: int
    expires_at: int | None
    id: int | None = None


@dataclass
class Credit:
    order: int
    remaining: int
    expires_at: int | None


@dataclass
class Expect:
    """An expected result: field values, or an exception type."""

    fields: dict[str, Any] = field(default_factory=dict)
    raises: type[Exception] | None = None
    op: Op | None = None
    grant: Grant | None = None


class Model:
    def __init__(self) -> None:
        self.plan: str | None = None  # None until the first write creates the subject
        self.status = "active"
        self.anchor = 0
        self.past_due_since: int | None = None
        self.period_start: int | None = None
        self.used = 0
        self.overage = 0
        self.credits: list[Credit] = []
        self.ops: list[Op] = []
        self.grants: list[Grant] = []
        self.keys: dict[str, Op | Grant] = {}
        self._order = itertools.count()

    # -- state

    def spec(self) -> tuple[int, bool, int]:
        return PLAN_SPECS[self.plan or DEFAULT_PLAN]

    def period(self, now: int) -> tuple[int, int]:
        interval = self.spec()[2]
        start, k = self.anchor, 0
        while months_later(self.anchor, (k + 1) * interval) <= now:
            k += 1
        start = months_later(self.anchor, k * interval)
        return start, months_later(self.anchor, (k + 1) * interval)

    def create(self, now: int) -> None:
        if self.plan is None:
            self.plan, self.status, self.anchor = DEFAULT_PLAN, "active", now

    def sync(self, now: int) -> None:
        """Everything the passage of time does: new periods, expiries."""
        if self.plan is None:
            return
        start, _ = self.period(now)
        if start != self.period_start:
            self.period_start, self.used, self.overage = start, 0, 0
        for credit in self.credits:
            if credit.expires_at is not None and credit.expires_at <= now:
                credit.remaining = 0
        for op in self.ops:
            if op.state == "held" and op.expires_at is not None and op.expires_at <= now:
                op.state = "expired"
                self._free_key(op)

    def _free_key(self, op: Op) -> None:
        if op.key is not None and self.keys.get(op.key) is op:
            del self.keys[op.key]

    def usable(self, now: int) -> bool:
        if self.status in ("active", "trialing"):
            return True
        if self.status == "past_due":
            return self.past_due_since is not None and now < self.past_due_since + GRACE
        return False

    def free(self) -> int:
        return max(self.spec()[0] - self.used, 0)

    def credit_total(self) -> int:
        return sum(c.remaining for c in self.credits)

    def held(self) -> int:
        return sum(op.units for op in self.ops if op.state == "held")

    def available(self, own_hold: int = 0) -> int:
        return self.free() + self.credit_total() - (self.held() - own_hold)

    def take(self, units: int) -> tuple[int, int, int]:
        from_allowance = min(units, self.free())
        from_credit = min(units - from_allowance, self.credit_total())
        self.used += from_allowance
        left = from_credit
        order = sorted(
            self.credits, key=lambda c: (c.expires_at is None, c.expires_at or 0, c.order)
        )
        for credit in order:
            step = min(left, credit.remaining)
            credit.remaining -= step
            left -= step
        overage = units - from_allowance - from_credit
        self.overage += overage
        return from_allowance, from_credit, overage

    # -- operations

    def _prior(self, key: str | None, units: int) -> Op | None:
        prior = self.keys.get(key) if key is not None else None
        if prior is None:
            return None
        if isinstance(prior, Grant) or prior.units != units:
            raise IdempotencyKeyMismatch
        if prior.state == "held":
            raise OperationInProgress
        return prior

    def _denial(self, now: int, units: int) -> dict[str, Any] | None:
        available = self.available()
        if not self.usable(now):
            reason = "subscription_inactive"
        elif available >= units or self.spec()[1]:
            return None
        else:
            reason = "quota_exhausted" if available <= 0 else "insufficient_units"
        return {"ok": False, "reason": reason, "usage_remaining": max(available, 0)}

    def consume(self, now: int, units: int, key: str | None) -> Expect:
        self.create(now)
        self.sync(now)
        try:
            prior = self._prior(key, units)
        except (IdempotencyKeyMismatch, OperationInProgress) as exc:
            return Expect(raises=type(exc))
        if prior is not None:
            return Expect(
                {
                    "ok": True,
                    "replayed": True,
                    "consumed": prior.charged,
                    "usage_remaining": prior.remaining_after,
                    "entry_id": prior.id,
                    "overage": prior.split[2],
                }
            )
        denial = self._denial(now, units)
        if denial is not None:
            return Expect({**denial, "consumed": 0, "replayed": False})
        available = self.available()
        op = Op("consume", key, units, "committed", charged=units)
        op.remaining_after = max(available - units, 0)
        op.split = self.take(units)
        self.ops.append(op)
        if key is not None:
            self.keys[key] = op
        fields = {"ok": True, "replayed": False, "consumed": units, "overage": op.split[2]}
        return Expect({**fields, "usage_remaining": op.remaining_after}, op=op)

    def reserve(self, now: int, units: int, key: str | None, ttl: int) -> Expect:
        self.create(now)
        self.sync(now)
        try:
            prior = self._prior(key, units)
        except (IdempotencyKeyMismatch, OperationInProgress) as exc:
            return Expect(raises=type(exc))
        if prior is not None:
            return Expect(
                {
                    "ok": True,
                    "replayed": True,
                    "consumed": prior.charged,
                    "usage_remaining": prior.remaining_after,
                    "id": prior.id,
                }
            )
        denial = self._denial(now, units)
        if denial is not None:
            return Expect({**denial, "replayed": False, "id": None})
        op = Op("reserve", key, units, "held", expires_at=now + ttl * US)
        remaining = max(self.available() - units, 0)
        self.ops.append(op)
        if key is not None:
            self.keys[key] = op
        fields = {"ok": True, "replayed": False, "usage_remaining": remaining, "consumed": 0}
        return Expect({**fields, "expires_at": from_us(now + ttl * US)}, op=op)

    def commit(self, now: int, op: Op, final: int) -> Expect:
        self.sync(now)
        if op.state == "expired":
            return Expect(raises=ReservationExpired)
        if op.state != "held":
            return Expect(raises=ReservationSettled)
        available = self.available(own_hold=op.units)
        if available < final and not self.spec()[1]:
            fields = {"ok": False, "reason": "insufficient_units", "consumed": 0}
            return Expect({**fields, "usage_remaining": max(available, 0), "replayed": False})
        op.split = self.take(final)
        op.state, op.charged = "committed", final
        op.remaining_after = max(available - final, 0)
        return Expect(
            {
                "ok": True,
                "replayed": False,
                "consumed": final,
                "usage_remaining": op.remaining_after,
                "overage": op.split[2],
                "entry_id": op.id,
            }
        )

    def release(self, now: int, op: Op) -> Expect:
        self.sync(now)
        if op.state == "committed":
            return Expect(raises=ReservationSettled)
        if op.state != "held":
            return Expect({"value": False})
        op.state = "released"
        self._free_key(op)
        return Expect({"value": True})

    def grant(self, now: int, units: int, key: str | None, expires_at: int | None) -> Expect:
        if expires_at is not None and expires_at <= now:
            return Expect(raises=InvalidInput)
        self.create(now)
        self.sync(now)
        prior = self.keys.get(key) if key is not None else None
        if prior is not None:
            if isinstance(prior, Grant) and (prior.units, prior.expires_at) == (units, expires_at):
                return Expect({"replayed": True, "entry_id": prior.id}, grant=prior)
            return Expect(raises=IdempotencyKeyMismatch)
        grant = Grant(key, units, expires_at)
        self.grants.append(grant)
        self.credits.append(Credit(next(self._order), units, expires_at))
        if key is not None:
            self.keys[key] = grant
        return Expect({"replayed": False}, grant=grant)

    def assign(self, now: int, plan: str, status: str) -> Expect:
        self.sync(now)
        if self.plan is None or self.plan != plan:
            self.anchor = now  # another plan: a new period from now
        was_past_due = self.plan is not None and self.status == "past_due"
        self.plan = plan
        if status == "past_due":
            since = self.past_due_since if was_past_due else None
            self.past_due_since = since if since is not None else now
        else:
            self.past_due_since = None
        self.status = status
        self.sync(now)
        start, end = self.period(now)
        return Expect(
            {
                "plan": plan,
                "status": status,
                "access": self.usable(now),
                "period_start": from_us(start),
                "period_end": from_us(end),
            }
        )

    def view(self, now: int) -> dict[str, Any]:
        """What balance() and check() must say now."""
        self.sync(now)
        allowance, overage_allowed, _ = self.spec()
        remaining = max(self.available(), 0)
        reason = None if self.usable(now) else "subscription_inactive"
        if reason is None and remaining <= 0 and not overage_allowed:
            reason = "quota_exhausted"
        return {
            "plan": self.plan or DEFAULT_PLAN,
            "status": self.status,
            "allowance": allowance,
            "used": self.used,
            "credits": self.credit_total(),
            "held": self.held(),
            "overage": self.overage,
            "usage_remaining": remaining,
            "reason": reason,
            "overage_allowed": overage_allowed,
        }

    def boundaries(self, now: int) -> list[int]:
        """Instants where something changes: TTLs, credit expiries, period end, grace end."""
        points = [op.expires_at for op in self.ops if op.state == "held" and op.expires_at]
        points += [c.expires_at for c in self.credits if c.remaining and c.expires_at]
        if self.plan is not None:
            points.append(self.period(now)[1])
            if self.status == "past_due" and self.past_due_since is not None:
                points.append(self.past_due_since + GRACE)
        return sorted(p for p in points if p > now)


# --------------------------------------------------------------------------- the machine


def fields_of(result: Any, names: dict[str, Any]) -> dict[str, Any]:
    return {name: getattr(result, name) for name in names}


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, ledger: Any, clock: ManualClock) -> None:
        super().__init__()
        self.ledger = ledger
        self.clock = clock
        clock.set(START)
        self.subject = "prop-" + uuid.uuid4().hex[:16]
        self.model = Model()
        # (reservation as returned, the model's op for it or None for refused/replayed ones)
        self.reservations: list[tuple[Reservation, Op | None]] = []
        self.requests: list[tuple[int, str]] = []  # (units, key) of keyed spending calls
        self.fresh_keys = itertools.count()

    def key(self, key: str | None, units: int) -> str | None:
        if key == "new":
            key = f"req-{next(self.fresh_keys)}"
        if key is not None:
            self.requests.append((units, key))
        return key

    @property
    def now(self) -> int:
        return self.clock.now_us()

    def expect(self, expected: Expect, call: Callable[[], Any]) -> Any:
        if expected.raises is not None:
            with pytest.raises(expected.raises):
                call()
            return None
        result = call()
        if "value" in expected.fields:
            assert result == expected.fields["value"]
        else:
            assert fields_of(result, expected.fields) == expected.fields, result
        return result

    # -- spending

    @rule(units=UNITS, key=KEYS)
    def consume(self, units: int, key: str | None) -> None:
        key = self.key(key, units)
        expected = self.model.consume(self.now, units, key)
        result = self.expect(
            expected, lambda: self.ledger.consume(self.subject, units, feature=FEATURE, key=key)
        )
        if result is not None and not result.ok:
            assert result.entry_id is None
        if expected.op is not None:
            expected.op.id = result.entry_id

    @rule(units=UNITS, key=KEYS, ttl=TTLS)
    def reserve(self, units: int, key: str | None, ttl: int) -> None:
        key = self.key(key, units)
        expected = self.model.reserve(self.now, units, key, ttl)
        result = self.expect(
            expected,
            lambda: self.ledger.reserve(self.subject, units, feature=FEATURE, key=key, ttl=ttl),
        )
        if result is None:
            return
        if expected.op is not None:
            expected.op.id = result.id
        self.reservations.append((result, expected.op))

    def pick(self, pick: int, live: bool) -> tuple[Reservation, Op | None]:
        """Mostly a reservation still held (per the model), else any of them."""
        held = [(r, op) for r, op in self.reservations if op is not None and op.state == "held"]
        choices = held if live and held else self.reservations
        return choices[pick % len(choices)]

    @precondition(lambda self: self.reservations)
    @rule(
        pick=st.integers(0, 1000),
        live=st.sampled_from([True, True, True, False]),
        final=st.one_of(st.none(), st.integers(0, 15), st.integers(0, 40)),
    )
    def commit(self, pick: int, live: bool, final: int | None) -> None:
        reservation, op = self.pick(pick, live)
        if not reservation.ok:
            with pytest.raises(ReservationError):
                self.ledger.commit(reservation, units=final)
            return
        if op is None:  # a replay: answered from the reservation, charges nothing
            result = self.ledger.commit(reservation, units=final)
            assert (result.ok, result.replayed, result.consumed) == (
                True,
                True,
                reservation.consumed,
            )
            return
        expected = self.model.commit(self.now, op, reservation.units if final is None else final)
        self.expect(expected, lambda: self.ledger.commit(reservation, units=final))

    @precondition(lambda self: self.reservations)
    @rule(pick=st.integers(0, 1000), live=st.sampled_from([True, True, False]))
    def release(self, pick: int, live: bool) -> None:
        reservation, op = self.pick(pick, live)
        if op is None:
            assert self.ledger.release(reservation) is False
            return
        self.expect(self.model.release(self.now, op), lambda: self.ledger.release(reservation))

    @rule(
        units=st.integers(1, 40),
        key=KEYS,
        expires=st.one_of(
            st.sampled_from(EXPIRIES),  # absolute: a retried grant names the same instant
            st.integers(1, 60 * DAY).map(lambda seconds: ("from now", seconds)),
        ),
    )
    def grant(self, units: int, key: str | None, expires: int | tuple[str, int] | None) -> None:
        if key == "new":
            key = f"grant-{next(self.fresh_keys)}"
        if isinstance(expires, tuple):
            expires = self.now + expires[1] * US
        expected = self.model.grant(self.now, units, key, expires)
        expires_at = from_us(expires) if expires is not None else None
        result = self.expect(
            expected,
            lambda: self.ledger.grant(
                self.subject, units, feature=FEATURE, key=key, expires_at=expires_at
            ),
        )
        if result is not None and expected.grant is not None and expected.grant.id is None:
            expected.grant.id = result.entry_id

    @rule(plan=st.sampled_from(sorted(PLAN_SPECS)), status=STATUSES)
    def assign_plan(self, plan: str, status: str) -> None:
        expected = self.model.assign(self.now, plan, status)
        self.expect(expected, lambda: self.ledger.assign_plan(self.subject, plan, status=status))

    @rule(nudge=st.sampled_from([-1, 0, 1]), key=KEYS)
    def consume_the_rest(self, nudge: int, key: str | None) -> None:
        """Ask for exactly what is left (or one unit more or less): the edges of quota."""
        units = max(self.model.view(self.now)["usage_remaining"] + nudge, 1)
        self.consume(units, key)

    @precondition(lambda self: self.requests)
    @rule(pick=st.integers(0, 1000), as_reserve=st.booleans(), ttl=TTLS)
    def retry(self, pick: int, as_reserve: bool, ttl: int) -> None:
        """A client retrying an earlier keyed request verbatim (as a consume or a reserve)."""
        units, key = self.requests[pick % len(self.requests)]
        if as_reserve:
            self.reserve(units, key, ttl)
        else:
            self.consume(units, key)

    # -- time

    @rule(seconds=st.one_of(st.integers(1, 120), st.integers(60, DAY), st.integers(DAY, 40 * DAY)))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds=seconds)

    @rule(pick=st.integers(0, 1000), nudge=st.sampled_from([-1, 0, 1]))
    def advance_to_boundary(self, pick: int, nudge: int) -> None:
        """Land exactly on (or one microsecond around) the next instant where a rule flips."""
        points = self.model.boundaries(self.now)
        if points:
            target = points[pick % len(points)] + nudge
            if target > self.now:
                self.clock.set(from_us(target))

    # -- agreement

    @invariant()
    def balance_and_check_agree(self) -> None:
        expected = self.model.view(self.now)
        balance = self.ledger.balance(self.subject, FEATURE)
        names = ("plan", "status", "allowance", "used", "credits", "held", "overage")
        assert {n: getattr(balance, n) for n in (*names, "usage_remaining")} == {
            n: expected[n] for n in (*names, "usage_remaining")
        }
        check = self.ledger.check(self.subject, FEATURE)
        assert (
            check.allowed,
            check.reason,
            check.usage_remaining,
            check.limit,
            check.plan,
            check.overage_allowed,
        ) == (
            expected["reason"] is None,
            expected["reason"],
            expected["usage_remaining"],
            expected["allowance"],
            expected["plan"],
            expected["overage_allowed"],
        )

    @invariant()
    def history_explains_the_balance(self) -> None:
        lines = {line.id: line for line in self.ledger.history(self.subject, limit=1000)}
        spending = [line for line in lines.values() if line.kind in ("consume", "reserve")]
        assert len(spending) == len(self.model.ops)
        for op in self.model.ops:
            line = lines[op.id]
            assert (line.kind, line.units, line.key) == (op.kind, op.units, op.key)
            if op.state == "expired":  # expiry is applied lazily, at the next write
                assert line.state in ("held", "expired") and line.charged is None
            else:
                assert line.state == op.state
            if op.state == "committed":
                assert (line.charged, line.from_allowance, line.from_credit, line.overage) == (
                    op.charged,
                    *op.split,
                )
        grants = [line for line in lines.values() if line.kind == "grant"]
        assert sorted((g.id, g.units) for g in grants) == sorted(
            (g.id, g.units) for g in self.model.grants
        )


# --------------------------------------------------------------------------- the tests

# Sized for a 2-core CI runner: the whole file stays well under a minute.
EXAMPLES = {"sqlite-sync": 120, "sqlite-async": 50, "pg-sync": 60}
SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class AsyncDriver:
    """Runs each AsyncLedger call to completion on a private event loop."""

    def __init__(self, ledger: AsyncLedger) -> None:
        self._ledger = ledger
        self._runner = asyncio.Runner()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._ledger, name)
        return lambda *args, **kwargs: self._runner.run(method(*args, **kwargs))

    def close(self) -> None:
        self._runner.run(self._ledger.close())
        self._runner.close()


@contextmanager
def ledger_on(url: str, mode: str, clock: ManualClock) -> Iterator[Any]:
    options: dict[str, Any] = {"plans": PLANS, "default_plan": DEFAULT_PLAN, "clock": clock}
    ledger: Any = (
        Ledger(url, **options) if mode == "sync" else AsyncDriver(AsyncLedger(url, **options))
    )
    try:
        ledger.create_schema()
        yield ledger
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("database_url", "mode"),
    [
        pytest.param("sqlite", "sync", id="sqlite-sync"),
        pytest.param("sqlite", "async", id="sqlite-async"),
        pytest.param("postgres", "sync", id="pg-sync", marks=pytest.mark.postgres),
    ],
    indirect=["database_url"],
)
def test_ledger_follows_the_model(
    database_url: str, mode: str, request: pytest.FixtureRequest
) -> None:
    """On a fresh database (file or schema) from the ``database_url`` fixture."""
    clock = ManualClock(START)
    name = request.node.callspec.id
    with ledger_on(database_url, mode, clock) as ledger:
        run_state_machine_as_test(
            lambda: LedgerMachine(ledger, clock),
            settings=settings(SETTINGS, max_examples=EXAMPLES[name]),
        )
