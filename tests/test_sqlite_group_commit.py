"""The async SQLite executor's group commit: many operations per transaction, each isolated."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metered import (
    AsyncLedger,
    ConsumeResult,
    IdempotencyKeyMismatch,
    Ledger,
    LedgerUnavailable,
    OperationInProgress,
)
from metered._core import Op
from metered._drivers import SQLiteAsyncExecutor, SQLiteExecutor, _turn_for
from metered._sql import Stmt
from support import PLANS


@pytest.fixture
def path(tmp_path: Path) -> str:
    path = str(tmp_path / "ledger.db")
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
        ledger.assign_plan("user_1", "free")
        assert ledger.consume("user_1", 1, feature="api_calls").ok  # the account row exists
    return path


def _record_batch_sizes(ledger: AsyncLedger) -> list[int]:
    """The number of operations in each batch the worker runs from now on."""
    executor = ledger._executor
    assert isinstance(executor, SQLiteAsyncExecutor)
    run_batch = executor._sync.run_batch
    sizes: list[int] = []

    def counting(ops: list[Op]) -> list[tuple[bool, Any]]:
        sizes.append(len(ops))
        return run_batch(ops)

    executor._sync.run_batch = counting  # type: ignore[method-assign]
    return sizes


async def test_concurrent_tasks_share_transactions_and_spend_exactly(path: str) -> None:
    async with AsyncLedger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as ledger:
        commits = _record_batch_sizes(ledger)
        before = (await ledger.balance("user_1", "api_calls")).usage_remaining
        results = await asyncio.gather(
            *(ledger.consume("user_1", 1, feature="api_calls", key=f"k{i}") for i in range(300))
        )
        replays = await asyncio.gather(
            *(ledger.consume("user_1", 1, feature="api_calls", key=f"k{i}") for i in range(300))
        )
        balance = await ledger.balance("user_1", "api_calls")
    granted = sum(r.ok for r in results)
    assert granted == min(before, 300)
    assert all(r.reason == "quota_exhausted" for r in results if not r.ok)
    assert balance.usage_remaining == before - granted  # replays charged nothing
    assert sum(r.replayed for r in replays) == granted
    assert max(commits) > 1, "concurrent operations should have shared a transaction"
    assert sum(commits) == 300 + 300 + 2


def test_an_operation_that_fails_rolls_back_alone(path: str) -> None:
    executor = SQLiteExecutor(path)
    ledger = Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    stmts = ledger._ctx.stmts
    grant_sql = "UPDATE metered_accounts SET credit = credit + 7 WHERE subject = 'user_1'"

    def failing() -> Op:
        yield stmts.begin, {}
        yield type(stmts.begin)(grant_sql, (), "named", False), {}
        raise RuntimeError("the handler blew up mid-transaction")

    try:
        ops = [
            ledger._op_consume("user_1", 2, "api_calls", "before"),
            failing(),
            ledger._op_consume("user_1", 3, "api_calls", "after"),
        ]
        first, middle, last = executor.run_batch(ops)
        assert first[0] and first[1].consumed == 2
        assert not middle[0] and isinstance(middle[1], RuntimeError)
        assert last[0] and last[1].consumed == 3
        balance = ledger.balance("user_1", "api_calls")
        assert (balance.used, balance.credits) == (1 + 2 + 3, 0)  # the +7 credit is gone
    finally:
        executor.close()
        ledger.close()


async def test_every_waiter_hears_when_the_database_cannot_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/no/such/dir/ledger.db"
    async with AsyncLedger(url, plans=PLANS, default_plan="free") as ledger:
        outcomes = await asyncio.gather(
            *(ledger.consume("user_1", 1, feature="api_calls") for _ in range(20)),
            return_exceptions=True,
        )
    assert all(isinstance(o, LedgerUnavailable) for o in outcomes)


async def test_closed_ledger_refuses_new_work(path: str) -> None:
    ledger = AsyncLedger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    assert (await ledger.consume("user_1", 1, feature="api_calls")).ok
    await ledger.close()
    with pytest.raises(LedgerUnavailable):
        await ledger.consume("user_1", 1, feature="api_calls")


async def test_one_turn_of_the_loop_is_handed_over_as_one_batch(path: str) -> None:
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as setup:
        setup.grant("user_1", 1000, feature="api_calls")
    async with AsyncLedger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as ledger:
        sizes = _record_batch_sizes(ledger)
        assert (await ledger.consume("user_1", 1, feature="api_calls")).ok  # worker started
        executor = ledger._executor
        assert isinstance(executor, SQLiteAsyncExecutor)
        inbox, handed = executor._inbox, []

        def put(item: Any) -> None:
            handed.append(len(item) if item is not None else None)
            inbox.put(item)

        executor._inbox = SimpleNamespace(  # type: ignore[assignment]
            put=put, get=inbox.get, get_nowait=inbox.get_nowait, empty=inbox.empty
        )
        results = await asyncio.gather(
            *(ledger.consume("user_1", 1, feature="api_calls") for _ in range(100))
        )
        assert handed == [100], "the turn's operations, handed to the worker at once"
    assert all(r.ok for r in results)
    assert sizes == [1, 64, 36], "one turn's 100 operations, in batches of at most 64"


@pytest.mark.parametrize("started", [True, False], ids=["worker-running", "no-worker-yet"])
async def test_closing_runs_what_this_loop_has_not_handed_over_yet(
    path: str, started: bool
) -> None:
    ledger = AsyncLedger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    if started:
        assert (await ledger.consume("user_1", 1, feature="api_calls")).ok
    tasks = [
        asyncio.ensure_future(ledger.consume("user_1", 1, feature="api_calls", key=f"k{i}"))
        for i in range(10)
    ]
    await asyncio.sleep(0)  # the tasks are queued; their hand-over has not run yet
    await ledger.close()  # directly: in this same step, before the hand-over runs
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert all(r.ok for r in results)
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as check:
        assert check.balance("user_1", "api_calls").used == 1 + started + 10


async def test_a_hand_over_after_closing_is_refused(path: str) -> None:
    """Another loop's operations, queued before close() and handed over after it."""
    ledger = AsyncLedger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    executor = ledger._executor
    assert isinstance(executor, SQLiteAsyncExecutor)
    other = asyncio.new_event_loop()
    try:
        future = other.create_future()
        executor._pending[other] = [(ledger._op_consume("user_1", 1, "api_calls", None), future)]
        await ledger.close()
        executor._hand_over(other)
        assert isinstance(future.exception(), LedgerUnavailable)
    finally:
        other.close()


async def test_a_second_close_refuses_what_its_loop_queued(path: str) -> None:
    """Another thread closed the ledger (its worker is gone) after this loop queued an
    operation; this loop's own close() must refuse it, not queue it behind the stop."""
    ledger = AsyncLedger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    assert (await ledger.consume("user_1", 1, feature="api_calls")).ok
    task = asyncio.ensure_future(ledger.consume("user_1", 1, feature="api_calls"))
    await asyncio.sleep(0)  # queued; the hand-over has not run yet
    elsewhere = threading.Thread(target=lambda: asyncio.run(ledger.close()))
    elsewhere.start()
    elsewhere.join()
    await ledger.close()
    with pytest.raises(LedgerUnavailable):
        await asyncio.wait_for(task, 10)
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as check:
        assert check.balance("user_1", "api_calls").used == 1 + 1


def test_loops_in_several_threads_share_one_ledger(path: str) -> None:
    ledger = AsyncLedger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as setup:
        setup.grant("user_1", 1000, feature="api_calls")
    together = threading.Barrier(4)

    async def spend(thread: int) -> list[bool]:
        together.wait(10)  # every loop starts at once, so their hand-overs interleave
        results = await asyncio.gather(
            *(
                ledger.consume("user_1", 1, feature="api_calls", key=f"t{thread}-{i}")
                for i in range(50)
            )
        )
        return [r.ok for r in results]

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda t: asyncio.run(spend(t)), range(4)))
    asyncio.run(ledger.close())
    assert all(all(ok) for ok in outcomes)
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as check:
        balance = check.balance("user_1", "api_calls")
    assert balance.used + (1000 - balance.credits) == 1 + 200


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_worker(path: str) -> None:
    url = f"sqlite:///{path}"
    ledger = AsyncLedger(url, plans=PLANS, default_plan="free")
    assert asyncio.run(ledger.consume("user_1", 1, feature="api_calls", key="parent")).ok
    pid = os.fork()  # the parent's worker thread does not exist in the child
    if pid == 0:  # pragma: no cover - runs in the child
        signal.alarm(20)  # a hang fails the test instead of blocking it
        try:
            result = asyncio.run(ledger.consume("user_1", 1, feature="api_calls", key="child"))
            os._exit(0 if result.ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    asyncio.run(ledger.close())
    with Ledger(url, plans=PLANS, default_plan="free") as check:
        keys = {entry.key for entry in check.history("user_1")}
    assert {"parent", "child"} <= keys


async def test_a_batch_that_cannot_begin_writes_nothing(path: str) -> None:
    """Another program holds SQLite's write lock (without metered's turn): every queued
    operation is refused after one wait, none runs outside a transaction."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        async with AsyncLedger(
            f"sqlite:///{path}", plans=PLANS, default_plan="free", timeout=0.3
        ) as ledger:
            outcomes = await asyncio.gather(
                *(ledger.consume("user_1", 1, feature="api_calls", key=f"k{i}") for i in range(12)),
                return_exceptions=True,
            )
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert all(isinstance(o, LedgerUnavailable) for o in outcomes)
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as ledger:
        assert ledger.balance("user_1", "api_calls").used == 1  # only the fixture's unit


async def test_tasks_cancelled_while_queued_are_not_charged(path: str) -> None:
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the worker's first batch waits on SQLite's lock
    async with AsyncLedger(
        f"sqlite:///{path}", plans=PLANS, default_plan="free", timeout=5
    ) as ledger:
        first = asyncio.ensure_future(ledger.consume("user_1", 1, feature="api_calls", key="a"))
        await asyncio.sleep(0.05)  # the worker has taken it and is waiting to begin
        queued = [
            asyncio.ensure_future(ledger.consume("user_1", 1, feature="api_calls", key=f"q{i}"))
            for i in range(20)
        ]
        await asyncio.sleep(0.01)
        for task in queued:
            task.cancel()
        blocker.execute("ROLLBACK")
        blocker.close()
        assert (await first).ok
        await asyncio.gather(*queued, return_exceptions=True)
        balance = await ledger.balance("user_1", "api_calls")
    assert balance.used == 1 + 1  # the fixture's unit and the first task's


async def test_a_batch_that_cannot_get_the_write_turn_waits_once(path: str) -> None:
    turn = _turn_for(path)  # as another thread of this process writing would hold it
    turn.acquire()
    try:
        async with AsyncLedger(
            f"sqlite:///{path}", plans=PLANS, default_plan="free", timeout=0.3
        ) as ledger:
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(ledger.consume("user_1", 1, feature="api_calls", key=f"k{i}") for i in range(12)),
                return_exceptions=True,
            )
            waited = time.monotonic() - started
    finally:
        turn.release()
    assert all(isinstance(o, LedgerUnavailable) for o in outcomes)
    assert waited < 1.5, f"each operation waited out the timeout again ({waited:.2f} s)"


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("consume"), st.sampled_from([None, "a", "b", "c"]), st.integers(1, 30)),
        st.tuples(st.just("grant"), st.none(), st.integers(1, 40)),
        st.tuples(st.just("hold"), st.sampled_from([None, "h"]), st.integers(1, 30)),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS, settle=st.lists(st.integers(0, 30), min_size=40, max_size=40))
def test_concurrent_batches_keep_the_books(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, str | None, int]],
    settle: list[int],
) -> None:
    """Random operations fired at once through group commit: whatever the batching, every
    unit charged is accounted for, nothing is charged twice, nothing stays held."""
    url = f"sqlite:///{tmp_path_factory.mktemp('batch')}/ledger.db"
    with Ledger(url, plans=PLANS, default_plan="free") as setup:
        setup.create_schema()
        setup.assign_plan("user_1", "free")

    async def one(i: int, kind: str, key: str | None, units: int, ledger: AsyncLedger) -> Any:
        if kind == "consume":
            return await ledger.consume("user_1", units, feature="api_calls", key=key)
        if kind == "grant":
            return await ledger.grant("user_1", units, feature="api_calls")
        held = await ledger.reserve("user_1", units, feature="api_calls", key=key)
        if not held.ok or held.replayed:
            return held
        final = settle[i] % (units + 1)
        if final == 0:
            return await ledger.release(held)
        return await ledger.commit(held, final)

    async def run() -> list[Any]:
        async with AsyncLedger(url, plans=PLANS, default_plan="free") as ledger:
            return await asyncio.gather(
                *(one(i, *op, ledger) for i, op in enumerate(ops)), return_exceptions=True
            )

    outcomes = asyncio.run(run())
    charged = granted = 0
    by_key: dict[str, set[int]] = {}
    for (kind, key, units), outcome in zip(ops, outcomes):
        if isinstance(outcome, BaseException):
            # Only a reused key may be refused: another amount, or a twin still in flight.
            assert key is not None and isinstance(
                outcome, (IdempotencyKeyMismatch, OperationInProgress)
            )
            continue
        if kind == "grant":
            granted += units
        elif isinstance(outcome, ConsumeResult) and outcome.ok:
            if key is not None:
                by_key.setdefault(key, set()).add(outcome.consumed)
            if not outcome.replayed:
                charged += outcome.consumed
    with Ledger(url, plans=PLANS, default_plan="free") as ledger:
        balance = ledger.balance("user_1", "api_calls")
        history = ledger.history("user_1", limit=1000)
    assert balance.held == 0 and balance.overage == 0 and balance.usage_remaining >= 0
    assert charged == balance.used + (granted - balance.credits)
    assert all(len(amounts) == 1 for amounts in by_key.values()), by_key  # replays agree
    committed = [line for line in history if line.state == "committed"]
    assert sum(line.charged or 0 for line in committed) == charged


def test_a_batch_whose_begin_fails_commits_none_of_it(path: str) -> None:
    """BEGIN IMMEDIATE fails (another program writes without metered's turn); if that writer
    finishes mid-batch, the later operations must not run as transactions of their own."""
    ledger = Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    executor = SQLiteExecutor(path, busy_timeout=0.3)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    def after_the_other_writer(op: Op) -> Op:
        other.execute("COMMIT")
        return (yield from op)

    try:
        ops = [
            ledger._op_consume("user_1", 1, "api_calls", "k0"),
            after_the_other_writer(ledger._op_consume("user_1", 1, "api_calls", "k1")),
            ledger._op_consume("user_1", 1, "api_calls", "k2"),
        ]
        outcomes = executor.run_batch(ops)
        assert [ok for ok, _ in outcomes] == [False, False, False]
        assert all(isinstance(error, LedgerUnavailable) for _, error in outcomes)
        assert ledger.balance("user_1", "api_calls").used == 1  # only the fixture's unit
    finally:
        other.close()
        executor.close()
        ledger.close()


_TWICE_THE_SAME_CREDIT = (
    "INSERT INTO metered_credits (subject, id, feature, units, remaining, expires_at, created_at)"
    " VALUES ('user_1', 1, 'api_calls', 7, 7, NULL, 0), ('user_1', 1, 'api_calls', 7, 7, NULL, 0)"
)


def test_a_standalone_write_that_fails_rolls_back_alone(path: str) -> None:
    """A one-statement operation runs in the batch without a savepoint: SQLite must undo the
    failed statement's first row, and nothing else."""
    ledger = Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    executor = SQLiteExecutor(path)
    stmt = Stmt(_TWICE_THE_SAME_CREDIT, (), "named", returns_rows=False, standalone_write=True)

    def failing() -> Op:
        yield stmt, {}  # the second row breaks the primary key after the first was written

    try:
        first, middle, last = executor.run_batch(
            [
                ledger._op_consume("user_1", 2, "api_calls", "before"),
                failing(),
                ledger._op_consume("user_1", 3, "api_calls", "after"),
            ]
        )
        assert first[0] and first[1].consumed == 2
        assert not middle[0] and isinstance(middle[1], sqlite3.IntegrityError)
        assert last[0] and last[1].consumed == 3
        assert ledger.balance("user_1", "api_calls").used == 1 + 2 + 3
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT count(*) FROM metered_credits").fetchone() == (0,)
    finally:
        executor.close()
        ledger.close()


def test_a_batch_that_sqlite_rolls_back_fails_every_operation(path: str) -> None:
    """Some errors (SQLITE_FULL, SQLITE_IOERR) make SQLite roll the whole transaction back:
    the operations before it in the batch were undone too and must not be reported done."""
    ledger = Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    executor = SQLiteExecutor(path)

    def rolled_back(op: Op) -> Op:
        result = yield from op
        yield Stmt("ROLLBACK", (), "named", returns_rows=False), {}  # as SQLite would
        return result

    try:
        outcomes = executor.run_batch(
            [
                ledger._op_consume("user_1", 2, "api_calls", "k0"),
                rolled_back(ledger._op_consume("user_1", 3, "api_calls", "k1")),
                ledger._op_consume("user_1", 4, "api_calls", "k2"),
            ]
        )
        assert [ok for ok, _ in outcomes] == [False, False, False]
        assert all(isinstance(error, LedgerUnavailable) for _, error in outcomes)
        assert ledger.balance("user_1", "api_calls").used == 1  # only the fixture's unit
        assert {line.key for line in ledger.history("user_1")} == {None}
    finally:
        executor.close()
        ledger.close()
