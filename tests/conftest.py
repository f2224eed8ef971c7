"""Shared fixtures: every ledger test runs on SQLite and PostgreSQL, sync and async.

``ledger_factory`` builds a ledger on a fresh database: a temp file for SQLite, a fresh
schema (selected through ``search_path``) for PostgreSQL, so tests never see each other's
rows and can run in parallel. Async ledgers are wrapped in :class:`SyncFacade`, which runs
each call to completion on a private event loop, so one test body exercises both.

PostgreSQL tests need ``METERED_TEST_POSTGRES_URL``; without it they skip with a reason,
except under CI (``CI=true``), where a missing PostgreSQL fails the run.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from metered import AsyncLedger, Ledger, ManualClock, Plan
from metered.plans import Feature

POSTGRES_URL = os.environ.get("METERED_TEST_POSTGRES_URL")
UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

START = datetime(2026, 1, 15, 12, 0, tzinfo=timezone.utc)

PLANS = [
    Plan("free", features={"api_calls": 100}),
    Plan(
        "pro",
        prices=["price_pro_monthly"],
        features={
            "api_calls": 10_000,
            "reports": True,
            "tokens": Feature(units=1000, overage=True),
        },
    ),
    Plan("rollover", features={"api_calls": Feature(units=50, rollover=True)}),
    Plan("payg", features={"api_calls": 0}),
]


def require_postgres() -> str:
    if POSTGRES_URL:
        return POSTGRES_URL
    if UNDER_CI:
        pytest.fail("CI=true but METERED_TEST_POSTGRES_URL is not set: PostgreSQL tests must run")
    pytest.skip(
        "PostgreSQL tests need METERED_TEST_POSTGRES_URL (e.g. postgresql://postgres@127.0.0.1/test)"
    )


class PostgresSchema:
    """A throwaway schema; its URL points ``search_path`` at it."""

    def __init__(self, base_url: str) -> None:
        import psycopg

        self.base_url = base_url
        self.name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.name}")
        sep = "&" if "?" in base_url else "?"
        self.url = f"{base_url}{sep}options={quote('-csearch_path=' + self.name)}"

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.base_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL for the backend the test is parametrised with (default SQLite)."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    schema = PostgresSchema(require_postgres())
    try:
        yield schema.url
    finally:
        schema.drop()


class SyncFacade:
    """Runs an AsyncLedger's coroutines to completion on a private loop, one call at a time."""

    def __init__(self, ledger: AsyncLedger) -> None:
        self._ledger = ledger
        self._runner = asyncio.Runner()
        self.catalog = ledger.catalog
        self.clock = ledger.clock
        self.is_async = True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ledger, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._runner.run(attr(*args, **kwargs))

        return call

    def close(self) -> None:
        self._runner.run(self._ledger.close())
        self._runner.close()


LEDGER_MODES = [
    pytest.param(("sqlite", "sync"), id="sqlite-sync"),
    pytest.param(("sqlite", "async"), id="sqlite-async"),
    pytest.param(("postgres", "sync"), id="pg-sync", marks=pytest.mark.postgres),
    pytest.param(("postgres", "async"), id="pg-async", marks=pytest.mark.postgres),
    pytest.param(("postgres", "asyncpg"), id="pg-asyncpg", marks=pytest.mark.postgres),
]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture(params=LEDGER_MODES)
def ledger_factory(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> Iterator[Callable[..., Any]]:
    """``make(**options)`` -> a ledger (sync, or async behind SyncFacade) on a fresh database.

    Defaults: the PLANS above, ``default_plan="free"``, the test's ManualClock.
    """
    backend, mode = request.param
    schema = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        schema = PostgresSchema(require_postgres())
        url = schema.url
        if mode == "asyncpg":
            url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    made: list[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("plans", PLANS)
        options.setdefault("default_plan", "free")
        options.setdefault("clock", clock)
        if mode == "sync":
            ledger: Any = Ledger(url, **options)
            ledger.create_schema()
        else:
            ledger = SyncFacade(AsyncLedger(url, **options))
            ledger.create_schema()
        made.append(ledger)
        return ledger

    make.url = url  # type: ignore[attr-defined]
    make.backend = backend  # type: ignore[attr-defined]
    make.mode = mode  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for ledger in made:
            ledger.close()
        if schema is not None:
            schema.drop()


@pytest.fixture
def ledger(ledger_factory: Callable[..., Any]) -> Any:
    """A ledger with the default PLANS, on every backend and mode."""
    return ledger_factory()
