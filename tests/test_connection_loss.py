"""A PostgreSQL connection that dies between reserve and commit: a precise error, nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest

from metered import AsyncLedger, Ledger, LedgerUnavailable
from support import PLANS, PostgresSchema, require_postgres

pytestmark = pytest.mark.postgres


@pytest.fixture
def schema() -> Iterator[PostgresSchema]:
    schema = PostgresSchema(require_postgres())
    with Ledger(schema.url, plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
    yield schema
    schema.drop()


def _terminate(base_url: str, pid: int) -> None:
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_sync_commit_after_the_connection_died(schema: PostgresSchema) -> None:
    with Ledger(schema.url, plans=PLANS, default_plan="free", pool_size=1) as ledger:
        held = ledger.reserve("user_1", 30, feature="api_calls", key="req-1")
        assert held.ok
        conn, _ = ledger._executor._idle[-1]  # type: ignore[attr-defined]
        pid = conn.info.backend_pid
        _terminate(schema.base_url, pid)

        with pytest.raises(LedgerUnavailable):
            ledger.commit(held)
        balance = ledger.balance("user_1", "api_calls")  # a fresh connection: nothing lost
        assert (balance.used, balance.held) == (0, 30)
        assert ledger.commit(held).consumed == 30  # the retry settles it exactly once
        assert ledger.balance("user_1", "api_calls").used == 30
        assert ledger.consume("user_1", 30, feature="api_calls", key="req-1").replayed


def test_async_consume_after_the_connection_died(schema: PostgresSchema) -> None:
    async def scenario() -> None:
        async with AsyncLedger(schema.url, plans=PLANS, default_plan="free", pool_size=1) as led:
            assert (await led.consume("user_1", 10, feature="api_calls", key="a")).ok
            async with led._executor._pool.connection() as conn:  # type: ignore[attr-defined]
                pid = conn.info.backend_pid
            await asyncio.to_thread(_terminate, schema.base_url, pid)
            with pytest.raises(LedgerUnavailable):
                await led.consume("user_1", 10, feature="api_calls", key="b")
            balance = await led.balance("user_1", "api_calls")
            assert balance.used == 10  # the failed call charged nothing
            assert (await led.consume("user_1", 10, feature="api_calls", key="b")).ok
            assert (await led.balance("user_1", "api_calls")).used == 20

    asyncio.run(scenario())
