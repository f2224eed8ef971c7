"""Shared fixtures: every ledger test runs on SQLite and PostgreSQL, sync and async.

``ledger_factory`` builds a ledger on a fresh database: a temp file for SQLite, a fresh
schema (selected through ``search_path``) for PostgreSQL, so tests never see each other's
rows and can run in parallel. Async ledgers are wrapped in :class:`SyncFacade`, which runs
each call to completion on a private event loop, so one test body exercises both.

PostgreSQL tests need ``METERED_TEST_POSTGRES_URL``; without it they skip with a reason,
except under CI (``CI=true``), where a missing PostgreSQL fails the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from metered import AsyncLedger, Ledger, ManualClock
from support import (  # noqa: F401  (re-exported for older imports)
    PLANS,
    POSTGRES_URL,
    START,
    UNDER_CI,
    PostgresSchema,
    SyncFacade,
    require_postgres,
)


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
