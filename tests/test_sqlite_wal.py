"""How metered keeps a SQLite file: 1 KiB pages on new files, checkpoints on their own thread."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from metered import AsyncLedger, Ledger, LedgerUnavailable, _sqlite_wal
from metered._drivers import SQLiteExecutor
from support import PLANS

DEADLINE_S = 20.0
"""Generous wall-clock limit for the checkpoint thread to get a turn on a loaded CI machine."""


def page_size(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def checkpointer(ledger: Ledger) -> _sqlite_wal.Checkpointer:
    executor = ledger._executor
    assert isinstance(executor, SQLiteExecutor)
    assert executor._checkpointer is not None
    return executor._checkpointer


@pytest.fixture
def every(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(_sqlite_wal, "CHECKPOINT_EVERY", 10)
    return 10


def test_a_new_file_gets_small_pages_whichever_side_creates_it(tmp_path: Path) -> None:
    schema_first, ledger_first = tmp_path / "schema.db", tmp_path / "ledger.db"
    with Ledger(f"sqlite:///{schema_first}", plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
    with Ledger(f"sqlite:///{ledger_first}", plans=PLANS, default_plan="free") as ledger:
        with pytest.raises(LedgerUnavailable, match="create_schema"):
            ledger._executor.connection()  # as a first operation would, before create_schema
        ledger.create_schema()
        assert ledger.consume("user_1", 1, feature="api_calls").ok
    assert page_size(schema_first) == page_size(ledger_first) == _sqlite_wal.PAGE_SIZE


def test_an_existing_file_keeps_its_page_size(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # as a file created by an earlier metered would be
        conn.execute("PRAGMA page_size=4096")
        conn.execute("CREATE TABLE app_data (x INTEGER)")
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
        assert ledger.consume("user_1", 5, feature="api_calls").ok
        assert ledger.balance("user_1", "api_calls").used == 5
    assert page_size(path) == 4096


def test_writers_wake_the_checkpoint_thread_and_lose_nothing(tmp_path: Path, every: int) -> None:
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    with Ledger(url, plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
        ledger.grant("user_1", 10_000, feature="api_calls")
        for i in range(every * 5):
            assert ledger.consume("user_1", 1, feature="api_calls", key=f"k{i}").ok
        wait_for(lambda: checkpointer(ledger).done >= 1, "a background checkpoint")
        thread = checkpointer(ledger)._thread
        assert thread is not None and thread.name == "metered-sqlite-checkpoint"
    assert not thread.is_alive(), "close() stops the checkpoint thread"
    with sqlite3.connect(path) as conn:  # a reader of the file alone sees every write
        conn.execute("PRAGMA journal_mode=DELETE")  # folds whatever WAL is left into the file
        (used,) = conn.execute(
            "SELECT used FROM metered_accounts WHERE subject = 'user_1'"
        ).fetchone()
    assert used == every * 5


def test_the_group_commit_worker_counts_its_batches(tmp_path: Path, every: int) -> None:
    async def scenario() -> int:
        url = f"sqlite:///{tmp_path / 'a.db'}"
        async with AsyncLedger(url, plans=PLANS, default_plan="free") as ledger:
            await ledger.create_schema()
            for i in range(every * 3):  # one at a time: one transaction each
                assert (await ledger.consume("user_1", 1, feature="api_calls", key=f"{i}")).ok
            sync = ledger._executor._sync  # type: ignore[attr-defined]
            wait_for(lambda: sync._checkpointer.done >= 1, "a background checkpoint")
            return int(sync._checkpointer.done)

    assert asyncio.run(scenario()) >= 1


def test_a_group_commit_counts_each_of_its_operations(tmp_path: Path, every: int) -> None:
    """Checkpoints are due per operation written, not per transaction: a worker that commits
    dozens at once must not leave the WAL to SQLite's own checkpoint inside a commit."""

    async def scenario() -> tuple[int, int]:
        url = f"sqlite:///{tmp_path / 'a.db'}"
        async with AsyncLedger(url, plans=PLANS, default_plan="free") as ledger:
            await ledger.create_schema()
            await ledger.grant("user_1", 1000, feature="api_calls")
            sync = ledger._executor._sync  # type: ignore[attr-defined]
            batches: list[int] = []
            run_batch = sync.run_batch

            def counting(ops: list[Any]) -> list[tuple[bool, Any]]:
                batches.append(len(ops))
                return run_batch(ops)  # type: ignore[no-any-return]

            sync.run_batch = counting
            results = await asyncio.gather(
                *(ledger.consume("user_1", 1, feature="api_calls") for _ in range(every * 3))
            )
            assert all(result.ok for result in results)
            wait_for(lambda: sync._checkpointer.done >= 1, "a background checkpoint")
            return len(batches), int(sync._checkpointer.done)

    transactions, done = asyncio.run(scenario())
    assert transactions < every, "the operations should have shared transactions"
    assert done >= 1


def test_a_checkpoint_that_fails_is_skipped_and_the_next_one_works(tmp_path: Path) -> None:
    folder = tmp_path / "not-yet"
    checkpointer = _sqlite_wal.Checkpointer(str(folder / "x.db"), every=1)
    try:
        checkpointer.wrote()  # the file cannot even be opened
        wait_for(lambda: checkpointer.failed >= 1, "a failed checkpoint")
        thread = checkpointer._thread
        assert thread is not None and thread.is_alive(), "a failure must not end the thread"
        assert checkpointer.done == 0

        folder.mkdir()
        conn = sqlite3.connect(folder / "x.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        checkpointer.wrote()
        wait_for(lambda: checkpointer.done >= 1, "a checkpoint once the file exists")
        conn.close()
    finally:
        checkpointer.close()
    assert not thread.is_alive()


def test_writes_while_checkpoints_run_from_many_threads(tmp_path: Path, every: int) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url, plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
        ledger.grant("user_1", 10_000, feature="api_calls")
        failures: list[BaseException] = []

        def spend(n: int) -> None:
            try:
                for i in range(50):
                    assert ledger.consume("user_1", 1, feature="api_calls", key=f"{n}-{i}").ok
            except BaseException as exc:  # reported below
                failures.append(exc)

        threads = [threading.Thread(target=spend, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE_S)
        assert not failures
        assert ledger.balance("user_1", "api_calls").usage_remaining == 100 + 10_000 - 400
        wait_for(lambda: checkpointer(ledger).done >= 1, "a background checkpoint")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_checkpoints_on_its_own_thread(tmp_path: Path, every: int) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url, plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
        ledger.grant("user_1", 10_000, feature="api_calls")
        for i in range(every):  # the parent's checkpoint thread is running
            assert ledger.consume("user_1", 1, feature="api_calls", key=f"p{i}").ok
        wait_for(lambda: checkpointer(ledger).done >= 1, "the parent's checkpoint")
        parents = checkpointer(ledger)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            signal.alarm(int(DEADLINE_S))
            try:
                for i in range(every * 2):
                    ok = ledger.consume("user_1", 1, feature="api_calls", key=f"c{i}").ok
                    if not ok:
                        os._exit(1)
                mine = checkpointer(ledger)
                while mine.done < 1:
                    time.sleep(0.01)
                os._exit(0 if mine is not parents else 3)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert ledger.balance("user_1", "api_calls").used == every * 3
