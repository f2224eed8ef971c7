"""The ledger's logic, written once for the sync and the async ledger (sans-IO).

Every operation is a generator: it yields ``(Stmt, params)`` pairs and receives the result
rows (a list of tuples) back; a statement that returns no rows gets one empty tuple per row
it changed. :class:`metered.ledger.Ledger` drives these generators on a
blocking connection, :class:`metered.ledger.AsyncLedger` on an asyncio one; neither holds
any business rule of its own. Transactions are explicit statements (``BEGIN``/``COMMIT``),
and the drivers roll back whatever is left open when a generator raises.

Fast path: consume, reserve, commit and release are one statement on PostgreSQL (see
:mod:`metered._sql`). When the account row is missing or due for a recheck (period ended,
a credit or reservation expired, the plan changed), the operation *normalises* the account
in a short transaction and tries again: that is where expiry and rollover happen, lazily,
without any background job.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import threading
from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import Any

from metered import _fork
from metered._sql import (
    ACCOUNT_COLUMNS,
    APPLIED_COLUMNS,
    CHECK_COLUMNS,
    FAR_FUTURE,
    OPERATION_COLUMNS,
    PRIOR_COLUMNS,
    Statements,
)
from metered.clock import Clock, from_us
from metered.errors import (
    IdempotencyKeyMismatch,
    InvalidInput,
    InvalidUnits,
    LedgerUnavailable,
    NotMeteredFeature,
    OperationInProgress,
    ReservationError,
    ReservationExpired,
    ReservationNotFound,
    ReservationSettled,
)
from metered.periods import add_months, period_containing
from metered.plans import Catalog, Plan
from metered.results import (
    Balance,
    CheckResult,
    ConsumeResult,
    GrantResult,
    HistoryEntry,
    Reason,
    Reservation,
    Subscription,
)
from metered.validation import MAX_TOTAL

Rows = list[tuple[Any, ...]]
Op = Generator[tuple[Any, dict[str, Any]], Rows, Any]

STATUSES = frozenset(
    {
        "active",
        "trialing",
        "past_due",
        "canceled",
        "unpaid",
        "incomplete",
        "incomplete_expired",
        "paused",
    }
)
_ATTEMPTS = 5
"""Tries of one unit operation. A retry after normalisation decides at the operation's own
instant, taken once before its first try: normalisation leaves the account fresh until
after its own (later) clock reading, so the retry cannot find it due for a recheck again.
Re-reading the clock per try let holds that expired in between (abandoned reservations
expire all the time when workers die) send every try back to normalisation, until the
operation gave up with LedgerUnavailable."""


class _Ids:
    """Time-ordered 63-bit ids without a global sequence: ``ms << 22 | counter``.

    The counter starts at a random point per process and only moves forward, so ids are
    unique within a process even when a test clock stands still, and collide across
    processes only if two of them hit the same value in the same millisecond for the same
    subject (the primary key is ``(subject, id)``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = _fork.generation
        self._last = 0
        self._counter = itertools.count(secrets.randbits(21))

    def next(self, now_us: int) -> int:
        with self._lock:
            if _fork.generation != self._generation:  # forked: don't replay the parent's ids
                self.__init__()  # type: ignore[misc]
            candidate = ((now_us // 1000) << 22) | (next(self._counter) & 0x3FFFFF)
            self._last = max(self._last + 1, candidate)
            return self._last


@dataclass(frozen=True, slots=True)
class Context:
    """What the operations need besides their arguments."""

    stmts: Statements
    catalog: Catalog
    clock: Clock
    past_due_grace_us: int
    ids: _Ids


@dataclass(frozen=True, slots=True)
class SubjectState:
    plan: str
    status: str
    interval_months: int
    period_anchor: int
    period_start: int
    period_end: int
    past_due_since: int | None
    cancel_at_period_end: bool

    def rolled(self, now: int) -> SubjectState:
        """The state with its period moved forward to the one containing ``now``."""
        if self.period_end > now:
            return self
        start, end = period_containing(self.period_anchor, self.interval_months, now)
        return replace(self, period_start=start, period_end=end)


def access_until(ctx: Context, subject: SubjectState | None) -> int | None:
    """Until when the subscription status grants access (None: for as long as it lasts)."""
    if subject is None:
        return 0
    if subject.status in ("active", "trialing"):
        return None
    if subject.status == "past_due" and subject.past_due_since is not None:
        return subject.past_due_since + ctx.past_due_grace_us
    return 0


def _has_access(until: int | None, now: int) -> bool:
    return until is None or until > now


# --------------------------------------------------------------------------- reads


def _subject_from(row: tuple[Any, ...]) -> SubjectState:
    return SubjectState(
        plan=row[0],
        status=row[1],
        interval_months=row[2],
        period_anchor=row[3],
        period_start=row[4],
        period_end=row[5],
        past_due_since=row[6],
        cancel_at_period_end=bool(row[7]),
    )


def _default_subject(ctx: Context, now: int) -> SubjectState | None:
    name = ctx.catalog.default_plan
    if name is None:
        return None
    plan = ctx.catalog.plans[name]
    return SubjectState(
        plan=name,
        status="active",
        interval_months=plan.interval_months,
        period_anchor=now,
        period_start=now,
        period_end=_month_end(now, plan.interval_months),
        past_due_since=None,
        cancel_at_period_end=False,
    )


def _month_end(start: int, months: int) -> int:
    from metered.clock import to_us

    return to_us(add_months(from_us(start), months))


@dataclass(slots=True)
class _Credit:
    id: int
    units: int
    remaining: int
    expires_at: int | None


@dataclass(slots=True)
class _Normalized:
    """An account brought up to date, and the writes that get it there."""

    account: dict[str, Any]
    credit_updates: list[tuple[int, int]]
    expired_credits: list[tuple[int, int]]
    expired_holds: list[int]
    new_period: bool
    rollover_units: int


def _normalize_account(
    ctx: Context,
    feature: str,
    subject: SubjectState | None,
    account: dict[str, Any] | None,
    credits: list[_Credit],
    holds: list[tuple[int, int, int]],
    now: int,
) -> _Normalized:
    plan = ctx.catalog.plans.get(subject.plan) if subject else None
    spec = plan.features.get(feature) if plan else None
    entitled = spec is not None and spec.metered
    allowance = (spec.units or 0) if spec is not None and entitled else 0

    # Credits: what the fast path drew since the last reconciliation was taken from the
    # soonest-expiring credits first. Any expiry forces a recheck first, so drawing in that
    # order now gives the same split as drawing eagerly would have.
    credits = sorted(credits, key=lambda c: (c.expires_at is None, c.expires_at or 0, c.id))
    drawn = max(sum(c.remaining for c in credits) - (account["credit"] if account else 0), 0)
    credit_updates: list[tuple[int, int]] = []
    expired_credits: list[tuple[int, int]] = []
    credit_total = 0
    next_expiry = FAR_FUTURE
    for credit in credits:
        take = min(drawn, credit.remaining)
        drawn -= take
        remaining = credit.remaining - take
        if remaining and credit.expires_at is not None and credit.expires_at <= now:
            expired_credits.append((credit.id, remaining))
            remaining = 0
        if remaining != credit.remaining:
            credit_updates.append((credit.id, remaining))
        if remaining:
            credit_total += remaining
            if credit.expires_at is not None:
                next_expiry = min(next_expiry, credit.expires_at)

    expired_holds = [hold_id for hold_id, _, expires in holds if expires <= now]
    live_holds = [(units, expires) for _, units, expires in holds if expires > now]
    held = sum(units for units, _ in live_holds)
    for _, expires in live_holds:
        next_expiry = min(next_expiry, expires)

    period_start = subject.period_start if subject else 0
    period_end = subject.period_end if subject else FAR_FUTURE
    new_period = account is None or account["period_start"] != period_start
    used = 0 if new_period else account["used"]  # type: ignore[index]
    overage = 0 if new_period else account["overage"]  # type: ignore[index]
    rollover_units = 0
    if (
        new_period
        and account is not None
        and spec is not None
        and spec.rollover
        and account["period_end"] <= period_start
    ):
        rollover_units = max(account["allowance"] - account["used"], 0)
        if subject is not None and account["period_end"] < period_start:
            # The period just before this one went untouched: all of its allowance is unused.
            prev_start, prev_end = period_containing(
                subject.period_anchor, subject.interval_months, period_start - 1
            )
            if prev_end == period_start and prev_start >= account["period_end"]:
                rollover_units = allowance
        if rollover_units:
            credit_total += rollover_units
            next_expiry = min(next_expiry, period_end)

    return _Normalized(
        account={
            "plan": subject.plan if subject else "",
            "status": subject.status if subject else "none",
            "entitled": entitled,
            "overage_allowed": bool(spec.overage) if spec is not None and entitled else False,
            "allowance": allowance,
            "used": used,
            "credit": credit_total,
            "held": held,
            "overage": overage,
            "period_start": period_start,
            "period_end": period_end,
            "access_until": access_until(ctx, subject),
            "recheck_at": min(period_end, next_expiry),
            "meter": spec.meter if spec is not None and entitled else None,
        },
        credit_updates=credit_updates,
        expired_credits=expired_credits,
        expired_holds=expired_holds,
        new_period=new_period,
        rollover_units=rollover_units,
    )


def _load_subject(ctx: Context, subject: str, now: int, *, write: bool) -> Op:
    """The subject's state with its period rolled to now; creates the default when writing."""
    stmts = ctx.stmts
    rows = yield stmts.subject_get, {"subject": subject}
    if not rows and write and (default := _default_subject(ctx, now)) is not None:
        yield stmts.subject_insert_default, _subject_params(subject, default, now)
        rows = yield stmts.subject_get, {"subject": subject}
    if not rows:
        return _default_subject(ctx, now) if not write else None
    state = _subject_from(rows[0])
    rolled = state.rolled(now)
    if write and rolled is not state:
        yield (
            stmts.subject_set_period,
            {
                "subject": subject,
                "period_start": rolled.period_start,
                "period_end": rolled.period_end,
                "now": now,
            },
        )
    return rolled


def _subject_params(subject: str, state: SubjectState, now: int) -> dict[str, Any]:
    return {
        "subject": subject,
        "plan": state.plan,
        "status": state.status,
        "interval_months": state.interval_months,
        "period_anchor": state.period_anchor,
        "period_start": state.period_start,
        "period_end": state.period_end,
        "past_due_since": state.past_due_since,
        "cancel_at_period_end": state.cancel_at_period_end,
        "now": now,
    }


def _load_pending(ctx: Context, subject: str, feature: str) -> Op:
    key = {"subject": subject, "feature": feature}
    credit_rows = yield ctx.stmts.credits_live, key
    hold_rows = yield ctx.stmts.held_live, key
    credits = [_Credit(r[0], r[1], r[2], r[3]) for r in credit_rows]
    return credits, [(r[0], r[1], r[2]) for r in hold_rows]


def transaction(ctx: Context, body: Op) -> Op:
    """Run a ``*_in_tx`` operation in its own transaction (rolled back by the driver on error)."""
    yield ctx.stmts.begin, {}
    result = yield from body
    yield ctx.stmts.commit_tx, {}
    return result


def normalize(ctx: Context, subject: str, feature: str) -> Op:
    """Bring one account up to date in its own transaction (expiry, rollover, plan changes)."""
    return (yield from transaction(ctx, normalize_in_tx(ctx, subject, feature, ctx.clock.now_us())))


def normalize_in_tx(ctx: Context, subject: str, feature: str, now: int) -> Op:
    """The body of :func:`normalize`, for callers that already opened a transaction.

    Locks the subject row, then the account row (the lock order every writer follows), and
    returns the account as written.
    """
    stmts = ctx.stmts
    state = yield from _load_subject(ctx, subject, now, write=True)
    key = {"subject": subject, "feature": feature}
    rows = yield stmts.account_get, key
    account = dict(zip(ACCOUNT_COLUMNS, rows[0])) if rows else None
    credits, holds = yield from _load_pending(ctx, subject, feature)
    result = _normalize_account(ctx, feature, state, account, credits, holds, now)

    for credit_id, remaining in result.credit_updates:
        yield stmts.credit_set_remaining, {**key, "id": credit_id, "remaining": remaining}
    for _credit_id, units in result.expired_credits:
        yield from _record(ctx, subject, feature, "credit_expired", units, now)
    for hold_id in result.expired_holds:
        yield stmts.operation_expire, {"subject": subject, "id": hold_id, "now": now}
    if result.rollover_units:
        period_end = result.account["period_end"]
        credit_id = yield from _record(
            ctx, subject, feature, "grant", result.rollover_units, now, expires_at=period_end
        )
        credit = {"id": credit_id, "units": result.rollover_units, "expires_at": period_end}
        yield stmts.credit_insert, {**key, **credit, "now": now}
    if result.new_period and result.account["entitled"]:
        yield from _record(ctx, subject, feature, "period", result.account["allowance"], now)
    yield stmts.account_upsert, {**key, **result.account, "now": now}
    return result.account


def _record(
    ctx: Context,
    subject: str,
    feature: str,
    kind: str,
    units: int,
    now: int,
    *,
    key: str | None = None,
    expires_at: int | None = None,
) -> Op:
    """Append a history line that is not a unit operation (grant, expiry, period start).

    Returns its id, or None when ``key`` is already taken. An id that another process drew
    for this subject in the same millisecond is drawn again.
    """
    params = {
        "subject": subject,
        "key": key,
        "feature": feature,
        "kind": kind,
        "state": "applied",
        "units": units,
        "charged": None,
        "now": now,
        "expires_at": expires_at,
    }
    for _ in range(_ATTEMPTS):
        entry_id = ctx.ids.next(now)
        if (yield ctx.stmts.operation_record, {**params, "id": entry_id}):
            return entry_id
        if key is not None and (yield ctx.stmts.operation_by_key, {"subject": subject, "key": key}):
            return None
    raise LedgerUnavailable("could not record the operation after repeated id collisions")


# --------------------------------------------------------------------------- unit ops


_NO_PRIOR = dict.fromkeys(PRIOR_COLUMNS)


def _unit_statement(ctx: Context, kind: str, params: dict[str, Any]) -> Op:
    """Run the decision and, when it says go, the writes of one unit operation.

    PostgreSQL does all of it in one statement. So does SQLite, whose triggers apply the
    account update: the statement decides and writes the operation, returning the figures
    only if it applied. Only a refusal reads the decision again, to say why.

    When the operation did not apply and carries a key, the row also describes the
    operation already recorded under that key (``p_*``), read in a second statement: a
    lookup in the decision itself would cost every call to serve the rare replay. On
    PostgreSQL it would also be wrong: the one-statement operation reads from a snapshot
    taken *before* it waited for the account row lock, so it would miss a same-key twin
    that committed in between (and deny it for lack of units instead of replaying it). The
    second statement's snapshot follows the decision.
    """
    stmts = ctx.stmts
    if stmts.single_statement:
        rows = yield stmts.unit_op[kind], params
        row = dict(zip(stmts.result_columns, rows[0])) if rows else None
        if row is not None and row["applied"]:
            row["remaining"] = max(row["available"] - params["units"], 0)
            return row
        return (yield from _with_prior(stmts, row, params))
    row = yield from _sqlite_apply(stmts, kind, params)
    if row is None or row["applied"] or not row["ok"] or row["p_id"] is not None:
        return row
    # Refused, yet the decision read after it says go: another writer changed the balance
    # in between. Decide again in one transaction, where the write and the reads agree.
    yield stmts.begin, {}
    row = yield from _sqlite_apply(stmts, kind, params)
    yield stmts.commit_tx, {}
    return row


def _sqlite_apply(stmts: Statements, kind: str, params: dict[str, Any]) -> Op:
    """SQLite's one-statement operation; if refused, the decision and the key's operation."""
    rows = yield stmts.unit_apply[kind], params
    if rows:
        return {**dict(zip(APPLIED_COLUMNS, rows[0])), "applied": 1}
    rows = yield stmts.unit_op[kind], params  # why not: the decision alone
    decision = dict(zip(stmts.result_columns, rows[0])) if rows else None
    return (yield from _with_prior(stmts, decision, params))


def _with_prior(stmts: Statements, row: dict[str, Any] | None, params: dict[str, Any]) -> Op:
    """Add the operation recorded under the key (``p_*``, all None without one) to a refusal."""
    if row is not None:
        row.update(_NO_PRIOR)
        if params["key"] is not None:
            key = {"subject": params["subject"], "key": params["key"]}
            prior = yield stmts.prior_by_key, key
            if prior:
                row.update(zip(PRIOR_COLUMNS, prior[0]))
    return row


def _denial(row: dict[str, Any]) -> Reason:
    if not row["entitled"]:
        return "no_entitlement"
    if not row["usable"]:
        return "subscription_inactive"
    return "quota_exhausted" if row["available"] <= 0 else "insufficient_units"


def _check_prior(row: dict[str, Any], feature: str, units: int, now: int) -> str:
    """What an existing operation under the same key means: 'replay', 'expired' or raise."""
    if row["p_state"] == "held" and row["p_expires_at"] is not None and row["p_expires_at"] <= now:
        # An expired reservation has given its key back, whether or not normalisation has
        # run yet: the key is free for any new operation, so nothing can mismatch it.
        return "expired"
    if (
        row["p_kind"] not in ("consume", "reserve")
        or row["p_feature"] != feature
        or row["p_units"] != units
    ):
        raise IdempotencyKeyMismatch(
            f"key already used for {row['p_kind']} of {row['p_units']} {row['p_feature']!r};"
            f" now asked for {units} {feature!r}"
        )
    if row["p_state"] == "held":
        if row["p_expires_at"] is not None and row["p_expires_at"] <= now:
            return "expired"
        raise OperationInProgress("an operation with this key is still in flight")
    return "replay"


def consume(ctx: Context, subject: str, feature: str, units: int, key: str | None) -> Op:
    _require_metered(ctx, feature)
    now = ctx.clock.now_us()  # one instant per operation, kept across retries (_ATTEMPTS)
    for _ in range(_ATTEMPTS):
        params: dict[str, Any] = {
            "subject": subject,
            "feature": feature,
            "units": units,
            "key": key,
            "id": ctx.ids.next(now),
            "now": now,
            "expires_at": None,
        }
        row = yield from _unit_statement(ctx, "consume", params)
        if row is None:
            yield from _precheck_key(ctx, subject, feature, units, key, now)
            if (yield from _ensure_account(ctx, subject, feature)):
                continue
            return _consume_denied(subject, feature, key, "no_entitlement", 0)
        if row["applied"]:
            return _charged(subject, feature, key, units, row, params["id"])
        if row["p_id"] is not None:
            if _check_prior(row, feature, units, now) == "replay":
                return ConsumeResult._make(
                    ok=True,
                    consumed=row["p_charged"] or 0,
                    usage_remaining=row["p_remaining"] or 0,
                    replayed=True,
                    reason=None,
                    subject=subject,
                    feature=feature,
                    key=key,
                    entry_id=row["p_id"],
                    overage=row["p_overage"] or 0,
                )
            yield from normalize(ctx, subject, row["p_feature"])  # expires the prior hold
            continue
        if not row["fresh"]:
            yield from normalize(ctx, subject, feature)
            continue
        if not row["ok"]:
            return _consume_denied(subject, feature, key, _denial(row), row["available"])
        # ok, yet the key was taken by an operation that had released it again when we looked.
    raise LedgerUnavailable("could not settle the operation after repeated contention")


def _consume_denied(
    subject: str, feature: str, key: str | None, reason: Reason, available: int
) -> ConsumeResult:
    return ConsumeResult._make(
        ok=False,
        consumed=0,
        usage_remaining=max(available, 0),
        replayed=False,
        reason=reason,
        subject=subject,
        feature=feature,
        key=key,
        entry_id=None,
        overage=0,
    )


def _charged(
    subject: str, feature: str, key: str | None, units: int, row: dict[str, Any], entry_id: int
) -> ConsumeResult:
    """The result of a consume or commit that the decision applied."""
    return ConsumeResult._make(
        ok=True,
        consumed=units,
        usage_remaining=row["remaining"],
        replayed=False,
        reason=None,
        subject=subject,
        feature=feature,
        key=key,
        entry_id=entry_id,
        overage=row["take_overage"],
    )


def _ensure_account(ctx: Context, subject: str, feature: str) -> Op:
    """Create the missing account row (normalisation always leaves one behind)."""
    yield from normalize(ctx, subject, feature)
    return True


def _precheck_key(
    ctx: Context, subject: str, feature: str, units: int, key: str | None, now: int
) -> Op:
    """Raise for a misused key *before* creating a missing account: bad calls write nothing."""
    if key is None:
        return
    rows = yield ctx.stmts.operation_by_key, {"subject": subject, "key": key}
    if rows:
        prior = dict(zip(OPERATION_COLUMNS, rows[0]))
        names = ("kind", "feature", "units", "state", "expires_at")
        _check_prior({f"p_{name}": prior[name] for name in names}, feature, units, now)


def _require_metered(ctx: Context, feature: str) -> None:
    if not ctx.catalog.feature_is_metered(feature):
        raise NotMeteredFeature(f"feature {feature!r} is boolean; it has no units to spend")


def reserve(
    ctx: Context, subject: str, feature: str, units: int, key: str | None, ttl_us: int
) -> Op:
    _require_metered(ctx, feature)
    now = ctx.clock.now_us()  # one instant per operation, kept across retries (_ATTEMPTS)
    for _ in range(_ATTEMPTS):
        params: dict[str, Any] = {
            "subject": subject,
            "feature": feature,
            "units": units,
            "key": key,
            "id": ctx.ids.next(now),
            "now": now,
            "expires_at": now + ttl_us,
        }
        row = yield from _unit_statement(ctx, "reserve", params)
        if row is None:
            yield from _precheck_key(ctx, subject, feature, units, key, now)
            if (yield from _ensure_account(ctx, subject, feature)):
                continue
            return _reservation_denied(subject, feature, units, key, "no_entitlement", 0)
        if row["applied"]:
            return Reservation._make(
                ok=True,
                id=params["id"],
                subject=subject,
                feature=feature,
                units=units,
                key=key,
                expires_at=from_us(params["expires_at"]),
                usage_remaining=row["remaining"],
                reason=None,
                replayed=False,
                consumed=0,
            )
        if row["p_id"] is not None:
            if _check_prior(row, feature, units, now) == "replay":
                return Reservation._make(
                    ok=True,
                    id=row["p_id"],
                    subject=subject,
                    feature=feature,
                    units=units,
                    key=key,
                    expires_at=None,
                    usage_remaining=row["p_remaining"] or 0,
                    reason=None,
                    replayed=True,
                    consumed=row["p_charged"] or 0,
                )
            yield from normalize(ctx, subject, row["p_feature"])  # expires the prior hold
            continue
        if not row["fresh"]:
            yield from normalize(ctx, subject, feature)
            continue
        if not row["ok"]:
            return _reservation_denied(subject, feature, units, key, _denial(row), row["available"])
    raise LedgerUnavailable("could not settle the operation after repeated contention")


def _reservation_denied(
    subject: str, feature: str, units: int, key: str | None, reason: Reason, available: int
) -> Reservation:
    return Reservation._make(
        ok=False,
        id=None,
        subject=subject,
        feature=feature,
        units=units,
        key=key,
        expires_at=None,
        usage_remaining=max(available, 0),
        reason=reason,
        replayed=False,
        consumed=0,
    )


def _settle_target(reservation: Reservation) -> int:
    if not isinstance(reservation, Reservation):
        raise InvalidInput(f"expected a Reservation, got {type(reservation).__name__}")
    if not reservation.ok or reservation.id is None:
        raise ReservationError("this reservation was refused; there is nothing to settle")
    return reservation.id


def _settled_error(row: dict[str, Any], now: int) -> ReservationError:
    state = row["r_state"]
    if state is None:
        return ReservationNotFound("no such reservation for this subject")
    if state == "expired" or (state == "held" and row["r_expires_at"] <= now):
        return ReservationExpired("the reservation expired; its units went back to the balance")
    return ReservationSettled(f"the reservation was already {state}", state=state)


def commit(ctx: Context, reservation: Reservation, units: int | None) -> Op:
    if isinstance(reservation, Reservation) and reservation.replayed:
        return ConsumeResult._make(
            ok=True,
            consumed=reservation.consumed,
            usage_remaining=reservation.usage_remaining,
            replayed=True,
            reason=None,
            subject=reservation.subject,
            feature=reservation.feature,
            key=reservation.key,
            entry_id=reservation.id,
            overage=0,
        )
    target = _settle_target(reservation)
    final = reservation.units if units is None else units
    subject, feature = reservation.subject, reservation.feature
    now = ctx.clock.now_us()  # one instant per operation, kept across retries (_ATTEMPTS)
    for _ in range(_ATTEMPTS):
        params: dict[str, Any] = {
            "subject": subject,
            "feature": feature,
            "units": final,
            "key": None,
            "id": target,
            "now": now,
            "expires_at": None,
        }
        row = yield from _unit_statement(ctx, "commit", params)
        if row is None:
            raise ReservationNotFound("no such reservation for this subject")
        if row["applied"]:
            return _charged(subject, feature, reservation.key, final, row, target)
        if row["r_state"] != "held" or row["r_expires_at"] <= now:
            raise _settled_error(row, now)
        if not row["fresh"]:
            yield from normalize(ctx, subject, feature)
            continue
        return ConsumeResult._make(
            ok=False,
            consumed=0,
            usage_remaining=max(row["available"], 0),
            replayed=False,
            reason="insufficient_units",
            subject=subject,
            feature=feature,
            key=reservation.key,
            entry_id=target,
            overage=0,
        )
    raise LedgerUnavailable("could not settle the operation after repeated contention")


def release(ctx: Context, reservation: Reservation) -> Op:
    """Give a reservation's units back. Releasing twice, or after expiry, changes nothing."""
    if isinstance(reservation, Reservation) and (reservation.replayed or not reservation.ok):
        return False
    target = _settle_target(reservation)
    now = ctx.clock.now_us()
    params = {
        "subject": reservation.subject,
        "feature": reservation.feature,
        "units": 0,
        "key": None,
        "id": target,
        "now": now,
        "expires_at": None,
    }
    row = yield from _unit_statement(ctx, "release", params)
    if row is not None and row["applied"]:
        return True
    if row is None or row["r_state"] is None:
        raise ReservationNotFound("no such reservation for this subject")
    if row["r_state"] == "committed":
        raise ReservationSettled("the reservation was already committed", state="committed")
    return False


# --------------------------------------------------------------------------- writes


def grant(
    ctx: Context,
    subject: str,
    feature: str,
    units: int,
    key: str | None,
    expires_at: int | None,
) -> Op:
    _require_metered(ctx, feature)
    return (yield from transaction(ctx, grant_in_tx(ctx, subject, feature, units, key, expires_at)))


def grant_in_tx(
    ctx: Context,
    subject: str,
    feature: str,
    units: int,
    key: str | None,
    expires_at: int | None,
) -> Op:
    """The body of :func:`grant`, for callers that already opened a transaction."""
    stmts = ctx.stmts
    now = ctx.clock.now_us()
    if expires_at is not None and expires_at <= now:
        raise InvalidInput("expires_at is in the past; the credit would never be spendable")
    account = yield from normalize_in_tx(ctx, subject, feature, now)
    entry_id = yield from _record(
        ctx, subject, feature, "grant", units, now, key=key, expires_at=expires_at
    )
    if entry_id is None:
        rows = yield stmts.operation_by_key, {"subject": subject, "key": key}
        prior = dict(zip(OPERATION_COLUMNS, rows[0]))
        if (prior["kind"], prior["feature"], prior["units"], prior["expires_at"]) != (
            "grant",
            feature,
            units,
            expires_at,
        ):
            raise IdempotencyKeyMismatch(
                f"key already used for {prior['kind']} of {prior['units']} {prior['feature']!r}"
            )
        return _grant_result(subject, feature, units, key, expires_at, prior["id"], True)
    if account["credit"] + units > MAX_TOTAL:
        raise InvalidUnits(f"the credit balance would exceed {MAX_TOTAL} units")
    key_params = {"subject": subject, "feature": feature}
    credit = {"id": entry_id, "units": units, "expires_at": expires_at}
    yield stmts.credit_insert, {**key_params, **credit, "now": now}
    recheck = FAR_FUTURE if expires_at is None else expires_at
    yield (
        stmts.account_add_credit,
        {**key_params, "units": units, "now": now, "expires_at": recheck},
    )
    return _grant_result(subject, feature, units, key, expires_at, entry_id, False)


def revoke_in_tx(ctx: Context, subject: str, feature: str, grant_key: str, units: int | None) -> Op:
    """Take back up to ``units`` (default: all) of a grant's credits that are still unspent.

    Never below zero: what was already spent stays spent. Returns the units taken back.
    """
    stmts = ctx.stmts
    now = ctx.clock.now_us()
    yield from normalize_in_tx(ctx, subject, feature, now)  # reconciles credit remainders
    rows = yield stmts.operation_by_key, {"subject": subject, "key": grant_key}
    if not rows:
        return 0
    prior = dict(zip(OPERATION_COLUMNS, rows[0]))
    if prior["kind"] != "grant" or prior["feature"] != feature:
        raise IdempotencyKeyMismatch(f"key {grant_key!r} is not a grant of {feature!r}")
    credit_rows = yield stmts.credit_get, {"subject": subject, "id": prior["id"]}
    remaining = credit_rows[0][0] if credit_rows else 0
    take = remaining if units is None else min(units, remaining)
    if take <= 0:
        return 0
    key_params = {"subject": subject, "feature": feature}
    yield (
        stmts.credit_set_remaining,
        {**key_params, "id": prior["id"], "remaining": remaining - take},
    )
    yield (
        stmts.account_add_credit,
        {**key_params, "units": -take, "now": now, "expires_at": FAR_FUTURE},
    )
    yield from _record(ctx, subject, feature, "revoke", take, now)
    return take


def _grant_result(
    subject: str,
    feature: str,
    units: int,
    key: str | None,
    expires_at: int | None,
    entry_id: int,
    replayed: bool,
) -> GrantResult:
    return GrantResult._make(
        subject=subject,
        feature=feature,
        units=units,
        key=key,
        entry_id=entry_id,
        expires_at=from_us(expires_at) if expires_at is not None else None,
        replayed=replayed,
    )


def assign_plan(
    ctx: Context,
    subject: str,
    plan: Plan,
    status: str,
    period_start: int | None,
    period_end: int | None,
    cancel_at_period_end: bool,
) -> Op:
    body = assign_plan_in_tx(
        ctx, subject, plan, status, period_start, period_end, cancel_at_period_end
    )
    return (yield from transaction(ctx, body))


def assign_plan_in_tx(
    ctx: Context,
    subject: str,
    plan: Plan,
    status: str,
    period_start: int | None,
    period_end: int | None,
    cancel_at_period_end: bool,
) -> Op:
    """The body of :func:`assign_plan`, for callers that already opened a transaction."""
    stmts = ctx.stmts
    now = ctx.clock.now_us()
    rows = yield stmts.subject_get, {"subject": subject}
    old = _subject_from(rows[0]) if rows else None
    if period_start is not None:
        start = period_start
        end = period_end if period_end is not None else _month_end(start, plan.interval_months)
        # If no renewal arrives, later periods follow on from this one: on the grid of its
        # start when it is a whole interval, else from its end (a trial), never overlapping it.
        anchor = start if end == _month_end(start, plan.interval_months) else end
    elif old is not None and old.plan == plan.name:
        rolled = old.rolled(now)
        anchor, start, end = old.period_anchor, rolled.period_start, rolled.period_end
    else:
        anchor, start, end = now, now, _month_end(now, plan.interval_months)
    past_due_since = None
    if status == "past_due":
        past_due_since = old.past_due_since if old and old.status == "past_due" else now
        past_due_since = past_due_since if past_due_since is not None else now
    state = SubjectState(
        plan=plan.name,
        status=status,
        interval_months=plan.interval_months,
        period_anchor=anchor,
        period_start=start,
        period_end=end,
        past_due_since=past_due_since,
        cancel_at_period_end=cancel_at_period_end,
    )
    yield stmts.subject_upsert, _subject_params(subject, state, now)
    yield stmts.accounts_invalidate, {"subject": subject}
    return _subscription(subject, state, ctx, now)


def _subscription(subject: str, state: SubjectState, ctx: Context, now: int) -> Subscription:
    return Subscription._make(
        subject=subject,
        plan=state.plan,
        status=state.status,
        access=_has_access(access_until(ctx, state), now),
        period_start=from_us(state.period_start),
        period_end=from_us(state.period_end),
        cancel_at_period_end=state.cancel_at_period_end,
    )


# --------------------------------------------------------------------------- reads


def _read_state(ctx: Context, subject: str, feature: str, metered: bool) -> Op:
    """The subject and (for metered features) its account as normalisation would leave them.

    One indexed read in the common case; reads credits and holds too only when the account
    is due for a recheck. Never writes.
    """
    now = ctx.clock.now_us()
    rows = yield ctx.stmts.check_get, {"subject": subject, "feature": feature}
    if not rows:
        state = _default_subject(ctx, now)
        account_row = None
    else:
        state = _subject_from(rows[0]).rolled(now)
        account_row = rows[0][8:] if rows[0][8] is not None else None
    if not metered:
        return state, None, now
    account = dict(zip(ACCOUNT_COLUMNS, account_row)) if account_row else None
    if account is not None and account["recheck_at"] > now:
        return state, account, now
    credits, holds = (
        (yield from _load_pending(ctx, subject, feature)) if account is not None else ([], [])
    )
    return state, _normalize_account(ctx, feature, state, account, credits, holds, now).account, now


def check(ctx: Context, subject: str, feature: str) -> Op:
    metered = ctx.catalog.feature_is_metered(feature)
    if metered:
        # The common case is one single-table read: a fresh account row has everything.
        now = ctx.clock.now_us()
        params = {"subject": subject, "feature": feature}
        rows = yield ctx.stmts.check_read, params
        fresh = fresh_check(ctx, params, rows, now)
        if fresh is not None:
            return fresh
    state, account, now = yield from _read_state(ctx, subject, feature, metered)
    return _check_result(
        ctx,
        subject,
        feature,
        state.plan if state else "",
        state.status if state else "none",
        access_until(ctx, state),
        account,
        state.period_end if state else None,
        now,
    )


_RECHECK_AT = CHECK_COLUMNS.index("recheck_at")
_CHECK_FIELDS = set(CheckResult.model_fields)


def fresh_check(ctx: Context, params: dict[str, Any], rows: Rows, now: int) -> CheckResult | None:
    """Answer a check of a metered feature from the rows of ``ctx.stmts.check_read`` run
    with ``params``, or None when the account is missing or due for a recheck (run
    :func:`check` then).

    :func:`_check_result` unrolled for a fresh account row: this is the hot read, which the
    ledgers also run on its own, without driving a generator.
    """
    if not rows or rows[0][_RECHECK_AT] <= now:
        return None
    subject, feature = params["subject"], params["feature"]
    plan, status, entitled, overage_allowed, allowance, used, credit, held, period_end, until = (
        rows[0][:10]
    )
    reason: Reason | None = None
    remaining = max(max(allowance - used, 0) + credit - held, 0) if entitled else 0
    if (plan, feature) not in ctx.catalog.grants:
        reason = "no_entitlement"
    elif until is not None and until <= now:
        reason = "subscription_inactive"
    elif remaining <= 0 and not overage_allowed:
        reason = "quota_exhausted"
    return CheckResult._of(
        {
            "allowed": reason is None,
            "reason": reason,
            "subject": subject,
            "feature": feature,
            "plan": plan,
            "status": status,
            "metered": True,
            "usage_remaining": remaining,
            "limit": allowance,
            "overage_allowed": bool(overage_allowed),
            "period_end": _period_datetime(period_end) if period_end is not None else None,
        },
        _CHECK_FIELDS,
    )


def _check_result(
    ctx: Context,
    subject: str,
    feature: str,
    plan_name: str,
    status: str,
    until: int | None,
    account: dict[str, Any] | None,
    period_end: int | None,
    now: int,
) -> CheckResult:
    plan = ctx.catalog.plans.get(plan_name)
    spec = plan.features.get(feature) if plan else None
    reason: Reason | None = None
    remaining = limit = None
    overage_allowed = False
    if spec is None:
        reason = "no_entitlement"
    elif not _has_access(until, now):
        reason = "subscription_inactive"
    if account is not None:
        remaining = _account_remaining(account)
        limit = account["allowance"]
        overage_allowed = bool(account["overage_allowed"])
        if reason is None and remaining <= 0 and not overage_allowed:
            reason = "quota_exhausted"
    return CheckResult._make(
        allowed=reason is None,
        reason=reason,
        subject=subject,
        feature=feature,
        plan=plan_name,
        status=status,
        metered=spec.metered if spec is not None else ctx.catalog.metered[feature],
        usage_remaining=remaining,
        limit=limit,
        overage_allowed=overage_allowed,
        period_end=_period_datetime(period_end) if period_end is not None else None,
    )


_period_datetime = functools.lru_cache(maxsize=4096)(from_us)
"""Period ends repeat across every check of a period; datetimes are immutable."""


def _account_remaining(account: dict[str, Any]) -> int:
    free = max(account["allowance"] - account["used"], 0)
    return max(free + account["credit"] - account["held"], 0) if account["entitled"] else 0


def balance(ctx: Context, subject: str, feature: str) -> Op:
    _require_metered(ctx, feature)
    state, account, _ = yield from _read_state(ctx, subject, feature, True)
    account = account or _normalize_account(ctx, feature, state, None, [], [], 0).account
    return Balance._make(
        subject=subject,
        feature=feature,
        plan=state.plan if state else "",
        status=state.status if state else "none",
        allowance=account["allowance"],
        used=account["used"],
        credits=account["credit"],
        held=account["held"],
        overage=account["overage"],
        usage_remaining=_account_remaining(account),
        period_start=from_us(state.period_start) if state else None,
        period_end=from_us(state.period_end) if state else None,
    )


def history(ctx: Context, subject: str, feature: str | None, limit: int, before: int | None) -> Op:
    stmt = ctx.stmts.history[(feature is not None, before is not None)]
    params: dict[str, Any] = {"subject": subject, "limit": limit}
    if feature is not None:
        params["feature"] = feature
    if before is not None:
        params["before"] = before
    rows = yield stmt, params
    entries = []
    for row in rows:
        data = dict(zip(OPERATION_COLUMNS, row))
        entries.append(
            HistoryEntry._make(
                id=data["id"],
                subject=data["subject"],
                feature=data["feature"],
                kind=data["kind"],
                state=data["state"],
                units=data["units"],
                charged=data["charged"],
                from_allowance=data["from_allowance"],
                from_credit=data["from_credit"],
                overage=data["overage"],
                key=data["key"] if data["key"] is not None else data["released_key"],
                created_at=from_us(data["created_at"]),
                expires_at=from_us(data["expires_at"]) if data["expires_at"] is not None else None,
                settled_at=from_us(data["settled_at"]) if data["settled_at"] is not None else None,
            )
        )
    return entries
