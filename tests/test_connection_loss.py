"""A PostgreSQL connection that dies between reserve and commit: a precise error, nothing lost."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from metered import AsyncLedger, Ledger, LedgerUnavailable
from metered._sql import render
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


def test_sync_commit_after_the_idle_connection_died(schema: PostgresSchema) -> None:
    """The server ended the pooled connection between reserve and commit (a restart,
    pg_terminate_backend, idle_session_timeout): the commit notices before using it, takes
    a fresh connection, and settles exactly once."""
    with Ledger(schema.url, plans=PLANS, default_plan="free", pool_size=1) as ledger:
        held = ledger.reserve("user_1", 30, feature="api_calls", key="req-1")
        assert held.ok
        conn, _ = ledger._executor._idle[-1]  # type: ignore[attr-defined]
        _terminate(schema.base_url, conn.info.backend_pid)
        _wait_for_hang_up(conn)

        assert ledger.commit(held).consumed == 30
        assert conn.closed  # the dead one was dropped, not reused
        balance = ledger.balance("user_1", "api_calls")
        assert (balance.used, balance.held) == (30, 0)
        assert ledger.consume("user_1", 30, feature="api_calls", key="req-1").replayed


def test_sync_connection_killed_during_a_statement(schema: PostgresSchema) -> None:
    """A connection that dies while its statement runs cannot be retried blindly (did it
    commit?): a precise error, nothing half-done, and the next call works."""
    with Ledger(schema.url, plans=PLANS, default_plan="free", pool_size=1) as ledger:
        assert ledger.consume("user_1", 10, feature="api_calls", key="a").ok
        suicide = render("SELECT pg_terminate_backend(pg_backend_pid())", "pyformat")

        def killed() -> Any:
            return (yield suicide, {})

        with pytest.raises(LedgerUnavailable):
            ledger._executor.run(killed())
        assert ledger.balance("user_1", "api_calls").used == 10
        assert ledger.consume("user_1", 10, feature="api_calls", key="b").ok
        assert ledger.balance("user_1", "api_calls").used == 20


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_async_consume_after_the_idle_connection_died(schema: PostgresSchema, driver: str) -> None:
    url = schema.url
    if driver == "asyncpg":
        url = url.replace("postgresql://", "postgresql+asyncpg://", 1)

    async def backend_pid(led: AsyncLedger) -> int:
        rows = await led._executor.read(render("SELECT pg_backend_pid()", "pyformat"), {})
        return int(rows[0][0])

    async def scenario() -> None:
        async with AsyncLedger(url, plans=PLANS, default_plan="free", pool_size=1) as led:
            assert (await led.consume("user_1", 10, feature="api_calls", key="a")).ok
            pid = await backend_pid(led)
            await asyncio.to_thread(_terminate, schema.base_url, pid)
            await asyncio.sleep(0.2)  # the goodbye reaches the idle socket
            assert (await led.consume("user_1", 10, feature="api_calls", key="b")).ok
            assert await backend_pid(led) != pid
            assert (await led.balance("user_1", "api_calls")).used == 20

    asyncio.run(scenario())


def _wait_for_hang_up(conn: Any) -> None:
    """Until the server's goodbye has reached the client's socket (it is asynchronous)."""
    import select

    for _ in range(100):
        if select.select([conn.fileno()], [], [], 0)[0]:
            return
        time.sleep(0.02)
    pytest.fail("the terminated connection's socket never became readable")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_touches_the_parents_connections(schema: PostgresSchema) -> None:
    with Ledger(schema.url, plans=PLANS, default_plan="free") as ledger:
        assert ledger.consume("user_1", 1, feature="api_calls").ok  # the parent holds a conn
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            signal.alarm(20)
            try:
                ledger.close()  # must not end the parent's session on the shared socket
                ok = ledger.consume("user_1", 1, feature="api_calls").ok  # its own connection
                os._exit(0 if ok else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert ledger.consume("user_1", 1, feature="api_calls").ok
        assert ledger.balance("user_1", "api_calls").used == 3


def test_close_while_an_operation_runs_closes_its_connection_too(schema: PostgresSchema) -> None:
    ledger = Ledger(schema.url, plans=PLANS, default_plan="free")
    assert ledger.consume("user_1", 1, feature="api_calls").ok
    backend_pid = render("SELECT pg_backend_pid()", "pyformat")

    def closed_meanwhile() -> Any:
        rows = yield backend_pid, {}
        ledger.close()  # as another thread would, while this operation holds a connection
        return rows[0][0]

    pid = ledger._executor.run(closed_meanwhile())
    assert ledger._executor._idle == []  # type: ignore[attr-defined]
    with psycopg.connect(schema.base_url, autocommit=True) as admin:
        for _ in range(100):  # the server notices the closed socket within moments
            alive = admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
            if alive.fetchone() is None:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the connection in use during close() was kept open")


@pytest.mark.parametrize("driver", ["postgresql", "postgresql+asyncpg"])
def test_a_burst_of_first_calls_opens_one_pool(
    schema: PostgresSchema, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request of a server's first burst used to open a pool of its own; the spares
    were left behind, and psycopg's were closed under the requests still using them."""
    import asyncpg
    import psycopg_pool

    opened: list[object] = []
    psycopg_pool_class = psycopg_pool.AsyncConnectionPool
    create_pool = asyncpg.create_pool

    class CountedPool(psycopg_pool_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            opened.append(self)
            super().__init__(*args, **kwargs)

    def counted_create_pool(*args: Any, **kwargs: Any) -> Any:
        opened.append(object())
        return create_pool(*args, **kwargs)

    monkeypatch.setattr(psycopg_pool, "AsyncConnectionPool", CountedPool)
    monkeypatch.setattr(asyncpg, "create_pool", counted_create_pool)
    url = schema.url.replace("postgresql://", f"{driver}://", 1)

    async def scenario() -> None:
        async with AsyncLedger(url, plans=PLANS, default_plan="free") as ledger:
            results = await asyncio.gather(
                *(ledger.consume("user_1", 1, feature="api_calls") for _ in range(32))
            )
            assert all(result.ok for result in results)
            assert (await ledger.balance("user_1", "api_calls")).used == 32

    asyncio.run(scenario())
    assert len(opened) == 1


def test_a_pool_kept_busy_from_its_first_moment_stays_open(schema: PostgresSchema) -> None:
    """psycopg's ``pool.wait()`` closes a pool for good unless it holds ``min_size`` idle
    connections within the timeout; requests using its first connection the moment it
    opens prevent that, and every call after it failed with "the pool is already closed"."""

    with Ledger(schema.url, plans=PLANS, default_plan="free") as ledger:
        ledger.grant("user_1", 100_000, feature="api_calls")

    async def scenario() -> None:
        async with AsyncLedger(schema.url, plans=PLANS, default_plan="free", timeout=0.3) as led:
            deadline = asyncio.get_running_loop().time() + 1.0  # > three timeouts

            async def spend() -> int:
                spent = 0
                while asyncio.get_running_loop().time() < deadline:
                    assert (await led.consume("user_1", 1, feature="api_calls")).ok
                    spent += 1
                return spent

            spent = sum(await asyncio.gather(*(spend() for _ in range(16))))
            assert (await led.balance("user_1", "api_calls")).usage_remaining == (
                100 + 100_000 - spent
            )

    asyncio.run(scenario())
