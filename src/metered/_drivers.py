"""Database URLs and the executors that drive :mod:`metered._core` operations on a connection.

The hot path talks to the DB-API driver directly (``sqlite3``, psycopg 3, asyncpg) with
statements rendered once at start-up: no ORM and no SQL compilation per call. SQLAlchemy
parses URLs and owns schema and migrations (:mod:`metered.migrate`).

* SQLite: one ``sqlite3`` connection per thread (WAL); a unit operation is one autocommit
  statement, anything longer a ``BEGIN IMMEDIATE`` transaction, writers taking turns.
  The async ledger runs operations on one worker thread, many per transaction (group
  commit), so the event loop never waits on file I/O.
* PostgreSQL: autocommit psycopg 3 connections, so a single-statement operation is exactly
  one round trip: kept in a LIFO stack with their cursors by the sync ledger, in a
  ``psycopg_pool`` async pool by the async one; or an asyncpg pool when the URL asks for
  ``postgresql+asyncpg``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import queue
import re
import select
import sqlite3
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: threads still take turns, processes do not
    fcntl = None  # type: ignore[assignment]

from metered import _fork, _sqlite_wal
from metered._core import Op, Rows
from metered._sql import SQLITE_ACCOUNT_TRIGGERS, ParamStyle, Statements, Stmt
from metered.errors import ConfigurationError, LedgerUnavailable

DEFAULT_URL = "sqlite:///metered.db"
Driver = Literal["sqlite", "psycopg", "asyncpg"]


@dataclass(frozen=True)
class Target:
    """Where the ledger lives, as resolved from the URL the user wrote."""

    driver: Driver
    sqlalchemy_url: str
    """A synchronous SQLAlchemy URL for schema work (``sqlite://``, ``postgresql+psycopg://``)."""
    path: str | None = None
    conninfo: str | None = None

    @property
    def dialect(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.driver == "sqlite" else "postgresql"

    @property
    def paramstyle(self) -> ParamStyle:
        return {"sqlite": "named", "psycopg": "pyformat", "asyncpg": "dollar"}[self.driver]  # type: ignore[return-value]


def resolve_url(url: str | None, *, asynchronous: bool) -> Target:
    """Resolve a URL as users write it (``postgres://`` too); default ``$METERED_DATABASE_URL``."""
    raw = url or os.environ.get("METERED_DATABASE_URL") or DEFAULT_URL
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://") :]
    try:
        parsed = make_url(raw)
    except ArgumentError as exc:
        raise ConfigurationError(f"not a database URL: {raw!r}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite":
        if driver not in ("", "pysqlite", "aiosqlite"):
            raise ConfigurationError(f"unsupported SQLite driver {driver!r}")
        path = parsed.database or ":memory:"
        return Target("sqlite", f"sqlite:///{path}", path=path)
    if backend in ("postgresql", "postgres"):
        if driver in ("", "psycopg", "psycopg_async"):
            chosen: Driver = "psycopg"
        elif driver == "asyncpg":
            if not asynchronous:
                raise ConfigurationError(
                    "postgresql+asyncpg is an asyncio driver: use AsyncLedger, or a plain"
                    " postgresql:// URL (psycopg 3) with Ledger"
                )
            chosen = "asyncpg"
        else:
            raise ConfigurationError(
                f"unsupported PostgreSQL driver {driver!r}: use postgresql:// (psycopg 3)"
                " or postgresql+asyncpg://"
            )
        plain = parsed.set(drivername="postgresql")
        conninfo = plain.render_as_string(hide_password=False)
        return Target(
            chosen,
            parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False),
            conninfo=conninfo,
        )
    raise ConfigurationError(f"unsupported database {backend!r}: use sqlite:// or postgresql://")


def statements_for(target: Target) -> Statements:
    return Statements(target.dialect, target.paramstyle)


# --------------------------------------------------------------------------- driving


def drive(op: Op, execute: Callable[[Stmt, dict[str, Any]], Rows]) -> Any:
    """Run a core operation on a blocking connection."""
    try:
        stmt, params = next(op)
        while True:
            stmt, params = op.send(execute(stmt, params))
    except StopIteration as done:
        return done.value


async def drive_async(op: Op, execute: Callable[[Stmt, dict[str, Any]], Awaitable[Rows]]) -> Any:
    """Run a core operation on an asyncio connection."""
    try:
        stmt, params = next(op)
        while True:
            stmt, params = op.send(await execute(stmt, params))
    except StopIteration as done:
        return done.value


def _unavailable(exc: BaseException) -> LedgerUnavailable:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "no such table" in text or ("relation" in text and "does not exist" in text):
        return LedgerUnavailable(f"the ledger schema is missing ({text}); call create_schema()")
    return LedgerUnavailable(f"ledger database unavailable: {text}")


def _read(stmt: Stmt, params: dict[str, Any]) -> Op:
    return (yield stmt, params)


class SyncExecutor:
    """Runs operations to completion on a blocking connection."""

    def run(self, op: Op) -> Any:
        raise NotImplementedError

    def read(self, stmt: Stmt, params: dict[str, Any]) -> Rows:
        """Run one read-only statement (the ledgers' hot reads skip the generator protocol)."""
        return self.run(_read(stmt, params))  # type: ignore[no-any-return]

    def close(self) -> None:
        """Release connections."""


class AsyncExecutor:
    _open_lock: asyncio.Lock | None = None
    _open_loop: asyncio.AbstractEventLoop | None = None

    async def run(self, op: Op) -> Any:
        raise NotImplementedError

    def _opening(self, loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
        """One lock per event loop: a burst of first calls opens one pool, not one each."""
        if self._open_lock is None or self._open_loop is not loop:
            self._open_lock, self._open_loop = asyncio.Lock(), loop
        return self._open_lock

    async def read(self, stmt: Stmt, params: dict[str, Any]) -> Rows:
        """See :meth:`SyncExecutor.read`."""
        return await self.run(_read(stmt, params))  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Release connections."""


# --------------------------------------------------------------------------- SQLite


# OperationalErrors that mean "cannot use the database now", as opposed to a bug in a statement.
_SQLITE_UNAVAILABLE = re.compile(
    r"locked|busy|disk I/O|unable to open|readonly|read-only|database or disk is full|"
    r"no such table|malformed|not a database",
    re.IGNORECASE,
)


_SPIN_S = 0.0003
"""How long a writer yields the CPU in a loop before it sleeps, waiting for another process's
write turn. Transactions last tens of microseconds, and even a 50 us ``time.sleep`` wakes
late (timer slack), so most waits end within the spin."""


def _sqlite_rows(
    conn: sqlite3.Connection, cur: sqlite3.Cursor, sql: str, params: Any, returns_rows: bool
) -> Rows:
    """The statement's rows, or one empty tuple per row it changed (see :mod:`metered._core`).

    Counted with ``total_changes``: ``rowcount`` stays -1 for a statement that starts with WITH.
    That count includes rows changed by triggers, so a statement that fires the account
    triggers returns its rows instead (``RETURNING``).
    """
    if returns_rows:
        return cur.execute(sql, params).fetchall()
    before = conn.total_changes
    cur.execute(sql, params)
    return [()] * (conn.total_changes - before)


def _create_account_triggers(conn: sqlite3.Connection) -> None:
    """This connection's own triggers that keep account rows in step (see ``_sql``)."""
    for name, body in SQLITE_ACCOUNT_TRIGGERS.items():
        conn.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS {name} {body}")


_TURNS: dict[str, threading.Lock] = {}
_TURNS_LOCK = threading.Lock()


def _forget_turns() -> None:
    """In a forked child: the parent's threads may have held turns; they are not ours."""
    global _TURNS_LOCK
    _TURNS.clear()
    _TURNS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_turns)


def _turn_for(path: str) -> threading.Lock:
    """One lock per database file per process, shared by every ledger on that file."""
    key = path if path == ":memory:" else os.path.realpath(path)
    with _TURNS_LOCK:
        return _TURNS.setdefault(key, threading.Lock())


class SQLiteExecutor(SyncExecutor):
    """One connection per thread (and per process after a fork); ``:memory:`` shares one."""

    def __init__(self, path: str, *, busy_timeout: float = 30.0) -> None:
        self._path = path
        self._timeout = busy_timeout
        self._memory = path == ":memory:"
        self._local = threading.local()
        self._shared: sqlite3.Connection | None = None
        self._turn = _turn_for(path)
        self._lock_file: int | None = None
        self._all: list[sqlite3.Connection] = []
        self._generation = _fork.generation
        self._checkpointer = self._new_checkpointer()

    def _new_checkpointer(self) -> _sqlite_wal.Checkpointer | None:
        if self._memory:
            return None
        checkpointer = _sqlite_wal.Checkpointer(self._path)
        # A ledger dropped without close() must not leave its thread and connection behind.
        weakref.finalize(self, checkpointer.close, 0)
        return checkpointer

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=self._timeout
            )
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc
        try:
            _sqlite_wal.configure(conn, memory=self._memory, busy_timeout=self._timeout)
            # Before any table exists this fails ("no such table"): the connection is not
            # kept, and the next call, after create_schema(), makes a new one.
            _create_account_triggers(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise _unavailable(exc) from exc
        self._all.append(conn)
        return conn

    def connection(self) -> sqlite3.Connection:
        if self._memory:
            if self._shared is None:
                self._shared = self._connect()
            return self._shared
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def run(self, op: Op) -> Any:
        if _fork.generation != self._generation:  # forked: share neither connections nor locks
            self._local, self._all, self._generation = threading.local(), [], _fork.generation
            self._shared, self._turn, self._lock_file = None, _turn_for(self._path), None
            self._checkpointer = self._new_checkpointer()  # the parent's thread is not ours
        if self._memory:  # one connection for every thread: whole operations take turns
            if not self._turn.acquire(timeout=self._timeout):
                raise LedgerUnavailable(f"timed out after {self._timeout} s waiting for SQLite")
            try:
                return self._run(op, self.connection(), None)
            finally:
                self._turn.release()
        return self._run(op, self.connection(), self._turn)

    def read(self, stmt: Stmt, params: dict[str, Any]) -> Rows:
        if self._memory or _fork.generation != self._generation:
            return super().read(stmt, params)
        try:  # no turn to take: in WAL mode readers never wait for the writer
            cur = getattr(self._local, "reader", None)
            if cur is None:
                cur = self._local.reader = self.connection().cursor()
            return cur.execute(stmt.sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if _SQLITE_UNAVAILABLE.search(str(exc)):
                raise _unavailable(exc) from exc
            raise

    def _run(self, op: Op, conn: sqlite3.Connection, turn: threading.Lock | None) -> Any:
        # SQLite admits one writer at a time, and a writer that finds the database locked
        # polls with sleeps of 1 to 100 ms. Write transactions of one process therefore take
        # turns on a lock, which wakes the next one the moment the last one is done; only
        # writers in other processes meet SQLite's busy handler. Reads never wait (WAL).
        cur = conn.cursor()
        holding = False

        def execute(stmt: Stmt, params: dict[str, Any]) -> Rows:
            nonlocal holding
            sql = stmt.sql
            if turn is not None and not holding:
                if stmt.standalone_write:  # its own transaction: the turn for just this one
                    self._take_turn(turn)
                    try:
                        return _sqlite_rows(conn, cur, sql, params, stmt.returns_rows)
                    finally:
                        self._end_turn(turn)
                if sql[0] == "B" and sql.startswith("BEGIN"):
                    self._take_turn(turn)
                    holding = True
            rows = _sqlite_rows(conn, cur, sql, params, stmt.returns_rows)
            if holding and (sql == "COMMIT" or sql == "ROLLBACK"):
                holding = False
                self._end_turn(turn)  # type: ignore[arg-type]
            return rows

        try:
            return drive(op, execute)
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if _SQLITE_UNAVAILABLE.search(str(exc)):
                raise _unavailable(exc) from exc
            raise
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            if holding:
                self._end_turn(turn)  # type: ignore[arg-type]

    def run_batch(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """Run ``ops`` in one write transaction; ``(ok, result or error)`` for each.

        A statement that is a transaction by itself (``standalone_write``) runs as it is:
        SQLite undoes a failed statement alone. An operation's own ``BEGIN``/``COMMIT``
        become a savepoint and its release, and one that fails is rolled back to its
        savepoint. The batch's transaction starts at the first write and commits once at
        the end; if that fails, or an error makes SQLite roll it back, every operation fails.
        """
        if _fork.generation != self._generation or self._memory:
            return [self._outcome(self.run, op) for op in ops]
        conn, turn = self.connection(), self._turn
        cur = conn.cursor()
        began = in_savepoint = False
        refused: BaseException | None = None  # why the batch could not begin: tell the rest

        def begin() -> None:
            nonlocal began, refused
            if refused is not None:
                raise refused
            if began:
                return
            try:
                self._take_turn(turn)
            except LedgerUnavailable as exc:
                refused = exc
                raise
            try:
                cur.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._end_turn(turn)
                refused = _unavailable(exc)
                raise refused from exc
            began = True

        def execute(stmt: Stmt, params: dict[str, Any]) -> Rows:
            nonlocal in_savepoint
            sql = stmt.sql
            if stmt.standalone_write and not in_savepoint:
                begin()
            elif sql.startswith("BEGIN"):
                begin()
                sql, in_savepoint = "SAVEPOINT op", True
            elif sql == "COMMIT":
                sql, in_savepoint = "RELEASE op", False
            return _sqlite_rows(conn, cur, sql, params, stmt.returns_rows)

        outcomes: list[tuple[bool, Any]] = []
        try:
            for op in ops:
                outcomes.append(self._outcome(lambda op: drive(op, execute), op))
                if began and not conn.in_transaction:  # e.g. SQLITE_FULL rolls back it all
                    raise sqlite3.OperationalError("SQLite rolled the transaction back")
                if in_savepoint:  # the operation failed inside its transaction: undo it
                    cur.execute("ROLLBACK TO op")
                    cur.execute("RELEASE op")
                    in_savepoint = False
            if began:
                cur.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.Error):
                raise
            return [(False, _unavailable(exc)) for _ in ops]
        finally:
            if began:
                self._end_turn(turn, len(ops))
        return outcomes

    def _outcome(self, run: Callable[[Op], Any], op: Op) -> tuple[bool, Any]:
        try:
            return True, run(op)
        except sqlite3.OperationalError as exc:
            if _SQLITE_UNAVAILABLE.search(str(exc)):
                return False, _unavailable(exc)
            return False, exc
        except Exception as exc:
            return False, exc

    def _take_turn(self, turn: threading.Lock) -> None:
        """Become the one writer: first among this process's threads, then among processes.

        Between processes the turn is an ``flock`` on the database file (independent of the
        POSIX locks SQLite itself uses), polled: yielding the CPU for the first ``_SPIN_S``,
        then sleeping with backoff from 50 us to 1 ms. Waiting writers get in within
        microseconds to a millisecond of each other instead of sleeping in SQLite's busy
        handler for up to 100 ms.
        """
        deadline = time.monotonic() + self._timeout
        if not turn.acquire(timeout=self._timeout):
            raise LedgerUnavailable(f"timed out after {self._timeout} s waiting to write to SQLite")
        fd = self._lock_fd()
        if fd is None:
            return
        delay = 0.00005
        spin_until = 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                now = time.monotonic()
                if now >= deadline:
                    turn.release()
                    raise LedgerUnavailable(
                        f"timed out after {self._timeout} s waiting to write to SQLite"
                    ) from None
                if not spin_until:
                    spin_until = now + _SPIN_S
                if now < spin_until:
                    os.sched_yield()
                    continue
                time.sleep(delay)
                delay = min(delay * 2, 0.001)

    def _end_turn(self, turn: threading.Lock, operations: int = 1) -> None:
        fd = self._lock_fd()
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        turn.release()
        if self._checkpointer is not None:
            self._checkpointer.wrote(operations)

    def _lock_fd(self) -> int | None:
        if fcntl is None:
            return None
        if self._lock_file is None:
            self._lock_file = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._lock_file

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = self._new_checkpointer()
        for conn in self._all:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._all = []
        self._local = threading.local()
        self._shared = None
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None


class SQLiteAsyncExecutor(AsyncExecutor):
    """Runs SQLite operations on one worker thread, many per transaction (group commit).

    The event loop never touches the file. ``run`` adds the operation to its loop's list
    and awaits a future; the list is handed to the worker once per turn of the loop, with
    one put on a queue. The worker takes everything handed over, runs it in one write
    transaction (one that fails rolls back alone: see :meth:`SQLiteExecutor.run_batch`),
    commits once, and hands all the results back with one wake-up of each loop. Under
    concurrent requests this pays one commit and two thread switches per batch instead of
    per operation; a result is only delivered after the commit that made it durable.
    """

    _BATCH = 64

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self._sync = SQLiteExecutor(path, busy_timeout=timeout)
        self._fresh_state()
        self._closed = False

    def _fresh_state(self) -> None:
        self._inbox: queue.SimpleQueue[list[_Queued] | None] = queue.SimpleQueue()
        self._pending: dict[asyncio.AbstractEventLoop, list[_Queued]] = {}
        self._lock = threading.Lock()  # handing over (and starting the worker); closing
        self._thread: threading.Thread | None = None
        self._generation = _fork.generation

    async def run(self, op: Op) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._generation != _fork.generation:
            # A forked child has no worker thread, and the parent may have forked while
            # holding the lock: start over with fresh ones.
            self._fresh_state()
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        pending = self._pending.get(loop)
        if pending is None:  # the first operation of this turn of the loop
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append((op, future))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending.pop(loop, None)
        if batch is None:  # close() took it already
            return
        if self._generation != _fork.generation:  # forked since run(): this process's worker
            self._fresh_state()
        with self._lock:
            if not self._closed:
                self._submit(batch)
                return
        _refuse(batch)

    def _submit(self, batch: list[_Queued]) -> None:
        """Queue ``batch`` for the worker, starting it first if need be (holding the lock)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="metered-sqlite", daemon=True)
            self._thread.start()
        self._inbox.put(batch)

    def _work(self) -> None:
        inbox = self._inbox
        while True:
            batch = inbox.get()
            closing = batch is None
            batch = batch or []
            while not closing and not inbox.empty():  # whatever else is waiting, in order
                more = inbox.get_nowait()
                closing = more is None
                batch += more or []
            for start in range(0, len(batch), self._BATCH):
                self._run_batch(batch[start : start + self._BATCH])
            if closing:
                return

    def _run_batch(self, batch: list[_Queued]) -> None:
        # Cancelled while queued (a timeout, a client that went away): never started.
        batch = [(op, future) for op, future in batch if not future.cancelled()]
        if not batch:
            return
        try:
            outcomes = self._sync.run_batch([op for op, _ in batch])
        except BaseException as exc:  # e.g. no connection: every waiter hears of it
            outcomes = [(False, exc)] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for (_, future), outcome in zip(batch, outcomes):
            by_loop.setdefault(future.get_loop(), []).append((future, outcome))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle, settled)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        # What this loop queued in its current turn runs before the worker stops; what
        # other loops have not handed over yet is refused (see _hand_over). A loop closed
        # before its turn ended leaves operations nobody awaits: dropped, never run.
        for other in list(self._pending):  # one copy: other loops' threads may add keys
            if other.is_closed():
                self._pending.pop(other, None)
        with self._lock:
            pending = self._pending.pop(loop, None) or []
            if self._closed:  # closed before: the worker may be gone
                thread = None
            else:
                self._closed = True
                if pending:
                    self._submit(pending)
                    pending = []
                self._inbox.put(None)
                thread = self._thread
        _refuse(pending)
        await loop.run_in_executor(None, self._finish, thread)

    def _finish(self, thread: threading.Thread | None) -> None:
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._sync.close()


_Queued = tuple[Op, "asyncio.Future[Any]"]


def _refuse(batch: list[_Queued]) -> None:
    closed = LedgerUnavailable("the ledger is closed")
    _settle([(future, (False, closed)) for _, future in batch])


def _settle(settled: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    for future, (ok, value) in settled:
        if future.done():  # cancelled while queued: the operation ran, nobody waits
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


# --------------------------------------------------------------------------- PostgreSQL


def _psycopg_errors() -> tuple[type[BaseException], ...]:
    import psycopg
    from psycopg_pool import PoolTimeout

    return (psycopg.OperationalError, psycopg.errors.UndefinedTable, PoolTimeout, OSError)


def _server_hung_up(conn: Any) -> bool:
    """Whether the server has closed this idle connection (restart, ``pg_terminate_backend``,
    ``idle_session_timeout``): one non-blocking poll of its socket, no round trip.

    An idle autocommit connection that does not LISTEN gets nothing from PostgreSQL until it
    sends a query, except the goodbye (an error message, then end of file), so a readable
    socket means it is gone. Using it anyway fails the request it was checked out for.
    """
    if conn.closed:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


async def _check_idle_connection(conn: Any) -> None:
    """psycopg_pool's ``check``: refuse a connection the server hung up on.

    Closed first, so that the pool replaces it instead of handing it out again.
    """
    if _server_hung_up(conn):
        import psycopg

        await conn.close()
        raise psycopg.OperationalError("the server closed this idle connection")


def _missing(extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"PostgreSQL support needs the {extra!r} extra: pip install 'metered-billing[{extra}]'"
        f" ({exc})"
    )


class PsycopgExecutor(SyncExecutor):
    """psycopg 3 autocommit connections, each with its own cursor, reused newest-first.

    A unit operation is one statement, so what surrounds it shows: psycopg_pool's checkout
    and a new cursor per call cost about 60 us, a fifth of a round trip
    (``benchmarks/bench_ledger.py``). Here a checkout is a ``list.pop`` under a semaphore
    of ``pool_size`` slots. The stack is LIFO, so a sequential caller keeps using one hot
    connection (its server process and prepared statements), and extra connections are
    only opened when threads really overlap. A connection that fails, or is left in a
    transaction it cannot roll back, is closed instead of being returned.
    """

    def __init__(self, conninfo: str, *, pool_size: int, timeout: float) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise _missing("postgres", exc) from exc
        self._psycopg = psycopg
        self._errors = _psycopg_errors()
        self._conninfo, self._size, self._timeout = conninfo, pool_size, timeout
        self._idle: list[tuple[Any, Any]] = []
        self._slots = threading.BoundedSemaphore(pool_size)
        self._generation = _fork.generation
        self._epoch = 0
        """Moves on at close(): connections checked out before it are closed, not kept."""

    def _connect(self) -> tuple[Any, Any]:
        conn = self._psycopg.connect(
            self._conninfo, autocommit=True, connect_timeout=max(2, math.ceil(self._timeout))
        )
        return conn, conn.cursor()

    def _checkout(self) -> tuple[Any, Any]:
        """The newest idle connection the server still holds open, else a new one."""
        while True:
            try:
                conn, cur = self._idle.pop()
            except IndexError:
                return self._connect()
            if not _server_hung_up(conn):
                return conn, cur
            with contextlib.suppress(Exception):
                conn.close()

    def _forget_parent(self) -> None:
        """After a fork: drop, never close, the parent's connections (psycopg does not
        close a connection from a process other than the one that opened it; an explicit
        close() would end the parent's session)."""
        self._idle, self._generation = [], _fork.generation
        self._slots = threading.BoundedSemaphore(self._size)

    def run(self, op: Op) -> Any:
        if _fork.generation != self._generation:
            self._forget_parent()
        slots, epoch = self._slots, self._epoch
        if not slots.acquire(timeout=self._timeout):
            raise LedgerUnavailable(
                f"no PostgreSQL connection free within {self._timeout} s (pool_size={self._size})"
            )
        conn = cur = None
        try:
            conn, cur = self._checkout()

            def execute(stmt: Stmt, params: dict[str, Any]) -> Rows:
                cur.execute(stmt.sql, params)
                return cur.fetchall() if stmt.returns_rows else [()] * max(cur.rowcount, 0)

            try:
                return drive(op, execute)
            except BaseException:
                if not conn.closed and conn.info.transaction_status != 0:
                    conn.rollback()
                raise
        except self._errors as exc:
            raise _unavailable(exc) from exc
        finally:
            if conn is not None:  # keep it only if it is idle, healthy and not closed under us
                if epoch == self._epoch and not conn.closed and conn.pgconn.transaction_status == 0:
                    self._idle.append((conn, cur))
                else:
                    with contextlib.suppress(Exception):
                        conn.close()
            slots.release()

    def close(self) -> None:
        if _fork.generation != self._generation:
            self._forget_parent()
            return
        self._epoch += 1
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            with contextlib.suppress(Exception):
                conn.close()


class PsycopgAsyncExecutor(AsyncExecutor):
    """An asyncio psycopg 3 pool, opened lazily on the running event loop."""

    def __init__(self, conninfo: str, *, pool_size: int, timeout: float) -> None:
        try:
            import psycopg_pool  # noqa: F401
        except ImportError as exc:
            raise _missing("async", exc) from exc
        self._conninfo, self._size, self._timeout = conninfo, pool_size, timeout
        self._errors = _psycopg_errors()
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _get_pool(self) -> Any:
        from psycopg_pool import AsyncConnectionPool

        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is loop:
            return self._pool
        async with self._opening(loop):
            if self._pool is None or self._loop is not loop:
                # A pool belongs to one event loop; a new loop (e.g. per test) gets its own.
                pool = AsyncConnectionPool(
                    self._conninfo,
                    min_size=1,
                    max_size=self._size,
                    timeout=self._timeout,
                    kwargs={"autocommit": True},
                    check=_check_idle_connection,
                    open=False,
                    name="metered-async",
                )
                # No ``pool.wait()``: it closes the pool for good when the pool is not *full*
                # in time, which a burst of requests using its first connection prevents.
                # ``connection()`` waits up to ``timeout`` for a connection instead.
                await pool.open(wait=False)
                self._pool, self._loop = pool, loop
        return self._pool

    async def run(self, op: Op) -> Any:
        try:
            pool = await self._get_pool()
            async with pool.connection() as conn:
                cur = conn.cursor()

                async def execute(stmt: Stmt, params: dict[str, Any]) -> Rows:
                    await cur.execute(stmt.sql, params)
                    if stmt.returns_rows:
                        rows: Rows = await cur.fetchall()
                        return rows
                    return [()] * max(cur.rowcount, 0)

                try:
                    return await drive_async(op, execute)
                except BaseException:
                    if not conn.closed and conn.info.transaction_status != 0:
                        await conn.rollback()
                    raise
        except self._errors as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class AsyncpgExecutor(AsyncExecutor):
    """An asyncpg pool (``postgresql+asyncpg://``), opened lazily on the running event loop."""

    def __init__(self, conninfo: str, *, pool_size: int, timeout: float) -> None:
        try:
            import asyncpg
        except ImportError as exc:
            raise _missing("async", exc) from exc
        self._asyncpg = asyncpg
        self._dsn, self._size, self._timeout = conninfo, pool_size, timeout
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._errors: tuple[type[BaseException], ...] = (
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.UndefinedTableError,
            OSError,
            asyncio.TimeoutError,
        )

    async def run(self, op: Op) -> Any:
        try:
            loop = asyncio.get_running_loop()
            if self._pool is None or self._loop is not loop:
                async with self._opening(loop):
                    if self._pool is None or self._loop is not loop:
                        self._pool = await self._asyncpg.create_pool(
                            self._dsn, min_size=1, max_size=self._size, timeout=self._timeout
                        )
                        self._loop = loop
            async with self._pool.acquire(timeout=self._timeout) as conn:

                async def execute(stmt: Stmt, params: dict[str, Any]) -> Rows:
                    if not stmt.returns_rows:  # the status reads e.g. 'UPDATE 3'
                        status = await conn.execute(stmt.sql, *stmt.bind(params))
                        count = status.rsplit(" ", 1)[-1]
                        return [()] * int(count) if count.isdigit() else []
                    return [tuple(r) for r in await conn.fetch(stmt.sql, *stmt.bind(params))]

                try:
                    return await drive_async(op, execute)
                except BaseException:
                    if not conn.is_closed() and conn.is_in_transaction():
                        await conn.execute("ROLLBACK")
                    raise
        except self._errors as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def sync_executor(target: Target, *, pool_size: int, timeout: float) -> SyncExecutor:
    if target.driver == "sqlite":
        assert target.path is not None
        return SQLiteExecutor(target.path, busy_timeout=timeout)
    assert target.conninfo is not None
    return PsycopgExecutor(target.conninfo, pool_size=pool_size, timeout=timeout)


def async_executor(target: Target, *, pool_size: int, timeout: float) -> AsyncExecutor:
    if target.driver == "sqlite":
        assert target.path is not None
        return SQLiteAsyncExecutor(target.path, timeout=timeout)
    assert target.conninfo is not None
    if target.driver == "asyncpg":
        return AsyncpgExecutor(target.conninfo, pool_size=pool_size, timeout=timeout)
    return PsycopgAsyncExecutor(target.conninfo, pool_size=pool_size, timeout=timeout)
