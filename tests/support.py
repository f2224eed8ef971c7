"""Helpers shared by the test suite (imported as ``support``; conftest.py re-exports them).

Test modules import these from here, never from ``conftest``: pytest loads every
``conftest.py`` of the tree as a module named ``conftest``, so that name is ambiguous.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import pytest

from metered import AsyncLedger, Plan
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
