"""``Ledger`` and ``AsyncLedger``: the public face of the core.

Both validate their input in :class:`_LedgerBase` (before any I/O, so bad input writes
nothing) and hand the same :mod:`metered._core` operation to an executor: a blocking one
for :class:`Ledger`, an asyncio one for :class:`AsyncLedger`. The business rules live only
in the core; the methods here are one line each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from metered import _core, migrate
from metered import validation as check_input
from metered._drivers import (
    AsyncExecutor,
    SyncExecutor,
    Target,
    async_executor,
    resolve_url,
    statements_for,
    sync_executor,
)
from metered.clock import Clock, SystemClock, duration_us, to_us
from metered.errors import ConfigurationError, InvalidInput, UnknownPlan
from metered.plans import Catalog, Plan
from metered.results import (
    Balance,
    CheckResult,
    ConsumeResult,
    GrantResult,
    HistoryEntry,
    Reservation,
    Subscription,
)

PlansArg = Sequence[Plan] | Catalog | str | Path


class _LedgerBase:
    """Configuration and input validation shared by the sync and async ledgers.

    ``timeout`` bounds how long an operation waits for a database connection (and, on
    SQLite, for the write lock) before raising :class:`LedgerUnavailable`; keep it short on
    request paths so a database outage turns into fast 503s, not hung workers.
    """

    _asynchronous = False

    def __init__(
        self,
        url: str | None = None,
        *,
        plans: PlansArg,
        default_plan: str | None = None,
        clock: Clock | None = None,
        past_due_grace: timedelta = timedelta(days=3),
        reservation_ttl: timedelta | float = timedelta(minutes=5),
        pool_size: int = 10,
        timeout: float = 5.0,
    ) -> None:
        if isinstance(plans, (str, Path)):
            catalog = Catalog.load(plans)
        elif isinstance(plans, Catalog):
            catalog = plans
        else:
            catalog = Catalog(plans)
        if default_plan is not None:
            catalog = Catalog(catalog.plans.values(), default_plan)
        self.catalog = catalog
        self.target: Target = resolve_url(url, asynchronous=self._asynchronous)
        self.clock: Clock = clock or SystemClock()
        self.default_ttl_us = check_input.ttl_us(reservation_ttl)
        self._pool_size, self._timeout = pool_size, timeout
        self._ctx = _core.Context(
            stmts=statements_for(self.target),
            catalog=catalog,
            clock=self.clock,
            past_due_grace_us=duration_us(past_due_grace),
            ids=_core._Ids(),
        )
        self._check_stmt = self._ctx.stmts.check_read
        self._start()

    def _start(self) -> None:
        """Create the executor (a blocking one for Ledger, an asyncio one for AsyncLedger)."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ledger's database."""
        return self.target.sqlalchemy_url

    def _feature(self, feature: str | None) -> str:
        if feature is None:
            metered = [name for name, is_metered in self.catalog.metered.items() if is_metered]
            if len(metered) != 1:
                raise InvalidInput(
                    "feature= is required when the plans define more than one metered feature"
                )
            return metered[0]
        return check_input.feature(feature)

    # Each _op_* validates its arguments and returns the core operation, ready to drive.

    def _op_check(self, subject: str, feature: str | None) -> _core.Op:
        return _core.check(self._ctx, check_input.subject(subject), self._feature(feature))

    def _check_read(self, subject: str, feature: str | None) -> dict[str, Any] | None:
        """Validate a check of a metered feature and return the parameters of
        ``stmts.check_read``, whose one row answers it unless the account needs a recheck
        (:func:`metered._core.fresh_check`); None for a boolean feature."""
        kinds = self.catalog.metered
        if type(feature) is str and feature in kinds:  # a configured name needs no checks
            metered = kinds[feature]
        else:
            feature = self._feature(feature)
            metered = self.catalog.feature_is_metered(feature)
        if not metered:
            return None
        return {"subject": check_input.subject(subject), "feature": feature}

    def _op_consume(
        self, subject: str, units: int, feature: str | None, key: str | None
    ) -> _core.Op:
        return _core.consume(
            self._ctx,
            check_input.subject(subject),
            self._feature(feature),
            check_input.units(units),
            check_input.key(key),
        )

    def _op_reserve(
        self,
        subject: str,
        units: int,
        feature: str | None,
        key: str | None,
        ttl: timedelta | float | None,
    ) -> _core.Op:
        return _core.reserve(
            self._ctx,
            check_input.subject(subject),
            self._feature(feature),
            check_input.units(units),
            check_input.key(key),
            self.default_ttl_us if ttl is None else check_input.ttl_us(ttl),
        )

    def _op_commit(self, reservation: Reservation, units: int | None) -> _core.Op:
        if units is not None:
            units = check_input.units(units, allow_zero=True)
        return _core.commit(self._ctx, reservation, units)

    def _op_release(self, reservation: Reservation) -> _core.Op:
        return _core.release(self._ctx, reservation)

    def _op_grant(
        self,
        subject: str,
        units: int,
        feature: str | None,
        key: str | None,
        expires_at: datetime | None,
    ) -> _core.Op:
        if expires_at is not None and not isinstance(expires_at, datetime):
            raise InvalidInput("expires_at must be a datetime")
        return _core.grant(
            self._ctx,
            check_input.subject(subject),
            self._feature(feature),
            check_input.units(units),
            check_input.key(key),
            to_us(expires_at) if expires_at is not None else None,
        )

    def _op_assign_plan(
        self,
        subject: str,
        plan: str,
        status: str,
        period_start: datetime | None,
        period_end: datetime | None,
        cancel_at_period_end: bool,
    ) -> _core.Op:
        if not isinstance(plan, str):
            raise UnknownPlan(f"plan must be a plan name, got {type(plan).__name__}")
        if status not in _core.STATUSES:
            raise InvalidInput(f"unknown subscription status {status!r}")
        if period_end is not None and period_start is None:
            raise InvalidInput("period_end needs period_start")
        for when in (period_start, period_end):
            if when is not None and not isinstance(when, datetime):
                raise InvalidInput(f"billing periods are datetimes, got {type(when).__name__}")
        start = to_us(period_start) if period_start is not None else None
        end = to_us(period_end) if period_end is not None else None
        if start is not None and end is not None and end <= start:
            raise InvalidInput("period_end must be after period_start")
        return _core.assign_plan(
            self._ctx,
            check_input.subject(subject),
            self.catalog.plan(plan),
            status,
            start,
            end,
            bool(cancel_at_period_end),
        )

    def _op_balance(self, subject: str, feature: str | None) -> _core.Op:
        return _core.balance(self._ctx, check_input.subject(subject), self._feature(feature))

    def _op_history(
        self, subject: str, feature: str | None, limit: int, before: int | None
    ) -> _core.Op:
        limit = check_input.units(limit, name="limit")
        if before is not None and (
            isinstance(before, bool) or not isinstance(before, int) or not 0 < before < 2**63
        ):
            raise InvalidInput(f"before must be a history entry id, got {before!r}")
        return _core.history(
            self._ctx,
            check_input.subject(subject),
            check_input.feature(feature) if feature is not None else None,
            min(limit, 10_000),
            before,
        )


class Ledger(_LedgerBase):
    """Entitlements and usage balances in SQL, for threaded (WSGI) code.

    >>> ledger = Ledger("sqlite:///metered.db", plans=[Plan("free", features={"api_calls": 100})],
    ...                 default_plan="free")
    >>> ledger.create_schema()
    >>> ledger.consume("user_123", 1, feature="api_calls", key="request-1").ok
    True
    """

    _executor: SyncExecutor

    def _start(self) -> None:
        self._executor = sync_executor(
            self.target, pool_size=self._pool_size, timeout=self._timeout
        )

    def create_schema(self) -> None:
        """Create or upgrade the ledger's tables (idempotent; safe from many workers at once)."""
        migrate.upgrade(self.target.sqlalchemy_url)

    def check(self, subject: str, feature: str | None = None) -> CheckResult:
        """May ``subject`` use ``feature`` now, and how much is left? One read; never writes."""
        params = self._check_read(subject, feature)
        if params is not None:
            now = self.clock.now_us()
            rows = self._executor.read(self._check_stmt, params)
            result = _core.fresh_check(self._ctx, params, rows, now)
            if result is not None:
                return result
        return self._executor.run(self._op_check(subject, feature))  # type: ignore[no-any-return]

    def consume(
        self, subject: str, units: int, *, feature: str | None = None, key: str | None = None
    ) -> ConsumeResult:
        """Take ``units`` now, exactly once per ``key``. ``ok=False`` when the balance is short."""
        return self._executor.run(self._op_consume(subject, units, feature, key))  # type: ignore[no-any-return]

    def reserve(
        self,
        subject: str,
        units: int,
        *,
        feature: str | None = None,
        key: str | None = None,
        ttl: timedelta | float | None = None,
    ) -> Reservation:
        """Hold ``units`` for work in flight; settle with :meth:`commit` or :meth:`release`."""
        return self._executor.run(self._op_reserve(subject, units, feature, key, ttl))  # type: ignore[no-any-return]

    def commit(self, reservation: Reservation, units: int | None = None) -> ConsumeResult:
        """Charge a reservation, optionally a different final amount (the rest is returned)."""
        return self._executor.run(self._op_commit(reservation, units))  # type: ignore[no-any-return]

    def release(self, reservation: Reservation) -> bool:
        """Give a reservation's units back; False if there was nothing left to release."""
        return self._executor.run(self._op_release(reservation))  # type: ignore[no-any-return]

    def grant(
        self,
        subject: str,
        units: int,
        *,
        feature: str | None = None,
        key: str | None = None,
        expires_at: datetime | None = None,
    ) -> GrantResult:
        """Add credits (top-ups, promotions), idempotent by ``key``; spent after the allowance."""
        return self._executor.run(self._op_grant(subject, units, feature, key, expires_at))  # type: ignore[no-any-return]

    def assign_plan(
        self,
        subject: str,
        plan: str,
        *,
        status: str = "active",
        period_start: datetime | None = None,
        period_end: datetime | None = None,
        cancel_at_period_end: bool = False,
    ) -> Subscription:
        """Set a subject's plan and subscription state (the one write path Stripe sync uses)."""
        return self._executor.run(  # type: ignore[no-any-return]
            self._op_assign_plan(
                subject, plan, status, period_start, period_end, cancel_at_period_end
            )
        )

    def balance(self, subject: str, feature: str | None = None) -> Balance:
        """Allowance, usage, credits, holds and overage for the current period."""
        return self._executor.run(self._op_balance(subject, feature))  # type: ignore[no-any-return]

    def history(
        self,
        subject: str,
        *,
        feature: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[HistoryEntry]:
        """The subject's ledger lines, newest first (page with ``before=<last id>``)."""
        return self._executor.run(self._op_history(subject, feature, limit, before))  # type: ignore[no-any-return]

    def _run(self, op: _core.Op) -> Any:
        """Drive a core operation (for metered's own integrations, e.g. Stripe sync)."""
        return self._executor.run(op)

    def close(self) -> None:
        """Close the ledger's database connections."""
        self._executor.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLedger(_LedgerBase):
    """The same ledger for asyncio code; takes the same URLs and picks an async driver.

    SQLite operations run on one worker thread that commits concurrent ones together,
    PostgreSQL ones on psycopg's async connections (or asyncpg for ``postgresql+asyncpg://``):
    the event loop never blocks on the database.
    """

    _asynchronous = True

    _executor: AsyncExecutor

    def _start(self) -> None:
        self._executor = async_executor(
            self.target, pool_size=self._pool_size, timeout=self._timeout
        )

    async def create_schema(self) -> None:
        """Create or upgrade the ledger's tables (runs the migrations on a worker thread)."""
        await asyncio.to_thread(migrate.upgrade, self.target.sqlalchemy_url)

    async def check(self, subject: str, feature: str | None = None) -> CheckResult:
        """See :meth:`Ledger.check`."""
        params = self._check_read(subject, feature)
        if params is not None:
            now = self.clock.now_us()
            rows = await self._executor.read(self._check_stmt, params)
            result = _core.fresh_check(self._ctx, params, rows, now)
            if result is not None:
                return result
        return await self._executor.run(self._op_check(subject, feature))  # type: ignore[no-any-return]

    async def consume(
        self, subject: str, units: int, *, feature: str | None = None, key: str | None = None
    ) -> ConsumeResult:
        """See :meth:`Ledger.consume`."""
        return await self._executor.run(self._op_consume(subject, units, feature, key))  # type: ignore[no-any-return]

    async def reserve(
        self,
        subject: str,
        units: int,
        *,
        feature: str | None = None,
        key: str | None = None,
        ttl: timedelta | float | None = None,
    ) -> Reservation:
        """See :meth:`Ledger.reserve`."""
        return await self._executor.run(self._op_reserve(subject, units, feature, key, ttl))  # type: ignore[no-any-return]

    async def commit(self, reservation: Reservation, units: int | None = None) -> ConsumeResult:
        """See :meth:`Ledger.commit`."""
        return await self._executor.run(self._op_commit(reservation, units))  # type: ignore[no-any-return]

    async def release(self, reservation: Reservation) -> bool:
        """See :meth:`Ledger.release`."""
        return await self._executor.run(self._op_release(reservation))  # type: ignore[no-any-return]

    async def grant(
        self,
        subject: str,
        units: int,
        *,
        feature: str | None = None,
        key: str | None = None,
        expires_at: datetime | None = None,
    ) -> GrantResult:
        """See :meth:`Ledger.grant`."""
        return await self._executor.run(self._op_grant(subject, units, feature, key, expires_at))  # type: ignore[no-any-return]

    async def assign_plan(
        self,
        subject: str,
        plan: str,
        *,
        status: str = "active",
        period_start: datetime | None = None,
        period_end: datetime | None = None,
        cancel_at_period_end: bool = False,
    ) -> Subscription:
        """See :meth:`Ledger.assign_plan`."""
        return await self._executor.run(  # type: ignore[no-any-return]
            self._op_assign_plan(
                subject, plan, status, period_start, period_end, cancel_at_period_end
            )
        )

    async def balance(self, subject: str, feature: str | None = None) -> Balance:
        """See :meth:`Ledger.balance`."""
        return await self._executor.run(self._op_balance(subject, feature))  # type: ignore[no-any-return]

    async def history(
        self,
        subject: str,
        *,
        feature: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[HistoryEntry]:
        """See :meth:`Ledger.history`."""
        return await self._executor.run(self._op_history(subject, feature, limit, before))  # type: ignore[no-any-return]

    async def _run(self, op: _core.Op) -> Any:
        """Drive a core operation (for metered's own integrations, e.g. Stripe sync)."""
        return await self._executor.run(op)

    async def close(self) -> None:
        """Close the ledger's database connections (and its SQLite worker thread)."""
        await self._executor.close()

    async def __aenter__(self) -> AsyncLedger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncLedger", "ConfigurationError", "Ledger"]
