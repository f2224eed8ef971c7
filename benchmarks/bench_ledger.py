"""Time metered's ledger operations next to hand-written floors, measured in the same run.

For each backend this prints the time per operation (mean, p50 and p99 in microseconds) of
``consume``, ``reserve`` + ``commit`` and ``check`` through :class:`metered.Ledger`, next to
the *floor*: the same transactions written by hand on the same table layout, with

* SQLite: the stdlib :mod:`sqlite3` module on a held connection with the ledger's pragmas
  (WAL, ``synchronous=NORMAL``), one autocommit statement per operation as metered runs
  them: a conditional ``INSERT ... SELECT`` of the operation row from the account row (a
  conditional settle ``UPDATE`` for ``commit``), whose triggers on the ledger's tables
  update the account; ``check`` is one primary-key ``SELECT`` of the account row.
* PostgreSQL: raw psycopg 3 on a held autocommit connection, one statement per operation
  (a hand-written CTE doing the same conditional update + insert): one round trip. The
  tables are ``ANALYZE``d after the warm-up, as autovacuum keeps them on a live database
  (``--no-analyze``: the cold statistics of freshly created tables).

``r(mean)`` and ``r(p50)`` are metered / floor on means and on medians. The issue's targets
are SQLite ``consume`` <= 2.0x and ``check`` <= 1.5x, PostgreSQL ``consume`` <= 1.25x; they
are judged on medians, because SQLite's WAL checkpoints and PostgreSQL's commit fsyncs add
rare millisecond stalls to both sides, which make mean ratios noisy (and flattering). AsyncLedger
``consume`` is measured too, for information, next to an async floor (SQLite: the sync floor
run on a worker thread, as the async ledger does; PostgreSQL: psycopg's ``AsyncConnection``).

Method: every operation uses a fresh idempotency key and one unit; each implementation works
on its own subject (and, on SQLite, its own database file, so each pays for its own WAL
checkpoints); every variant is warmed up, then the variants of one operation run in
alternating batches (rotating the order each round) until each has ``--ops`` timed samples,
each timed alone with :func:`time.perf_counter_ns`.

Usage::

    .venv/bin/python benchmarks/bench_ledger.py                    # SQLite and PostgreSQL
    .venv/bin/python benchmarks/bench_ledger.py --backend sqlite --ops 5000
    .venv/bin/python benchmarks/bench_ledger.py --json > ledger.json
    .venv/bin/python benchmarks/bench_ledger.py --profile consume --backend postgres

PostgreSQL: ``--pg-url``, else ``$METERED_TEST_POSTGRES_URL``, else
``postgresql://postgres@127.0.0.1/test``. The run creates a throwaway schema (selected with
``search_path``) and drops it at the end. With ``--backend all`` an unreachable server is
reported and skipped; with ``--backend postgres`` it is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from metered import AsyncLedger, Ledger, Plan
from metered._drivers import _create_account_triggers

FEATURE = "api_calls"
ALLOWANCE = 10**15  # never runs out during a benchmark
PLAN = "bench"
PLANS = [Plan(PLAN, features={FEATURE: ALLOWANCE})]
TTL_S = 3600  # reservations outlive any run, so nothing expires mid-measurement
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1/test"

# (backend, operation) -> the target for metered / floor, judged on the medians.
TARGETS = {("sqlite", "consume"): 2.0, ("sqlite", "check"): 1.5, ("postgres", "consume"): 1.25}

OPERATIONS = ("consume", "reserve+commit", "check")


class BenchError(RuntimeError):
    """An operation did not do what the benchmark expects (so its timing would be wrong)."""


def now_us() -> int:
    return time.time_ns() // 1000


# --------------------------------------------------------------------------- measurement

SyncOp = Callable[[int], object]
AsyncOp = Callable[[int], Awaitable[object]]


def sync_runner(op: SyncOp) -> Callable[[int, int], list[int]]:
    """Run ``op(i)`` for ``n`` consecutive indexes, timing each call alone."""

    def run(start: int, n: int) -> list[int]:
        clock = time.perf_counter_ns
        out = [0] * n
        for j in range(n):
            t0 = clock()
            op(start + j)
            out[j] = clock() - t0
        return out

    return run


def async_runner(loop: asyncio.AbstractEventLoop, op: AsyncOp) -> Callable[[int, int], list[int]]:
    """The same for a coroutine function, on one long-lived event loop."""

    async def batch(start: int, n: int) -> list[int]:
        clock = time.perf_counter_ns
        out = [0] * n
        for j in range(n):
            t0 = clock()
            await op(start + j)
            out[j] = clock() - t0
        return out

    def run(start: int, n: int) -> list[int]:
        return loop.run_until_complete(batch(start, n))

    return run


@dataclass
class Variant:
    """One implementation of one operation, and its timed samples (ns)."""

    impl: str
    """``floor``, ``metered``, ``floor-async``, ``metered-async``, ``metered-asyncpg``."""
    label: str
    run: Callable[[int, int], list[int]]
    baseline: str | None = None
    """The ``impl`` this one is compared with (None for floors)."""
    samples: list[int] = field(default_factory=list)
    cursor: int = 0

    def go(self, n: int, *, record: bool) -> None:
        latencies = self.run(self.cursor, n)
        self.cursor += n
        if record:
            self.samples.extend(latencies)


def measure(
    variants: list[Variant],
    *,
    ops: int,
    rounds: int,
    warmup: int,
    after_warmup: Callable[[], None] | None = None,
) -> None:
    """Warm every variant up, then run them in alternating batches until each has ``ops``."""
    for variant in variants:
        variant.go(warmup, record=False)
    if after_warmup is not None:
        after_warmup()
    per_round = math.ceil(ops / rounds)
    for r in range(rounds):
        n = min(per_round, ops - r * per_round)
        if n <= 0:
            break
        shift = r % len(variants)
        order = variants[shift:] + variants[:shift]
        if r % 2:
            order.reverse()
        for variant in order:
            gc.collect()
            variant.go(n, record=True)


def floor_and_metered(label: str, floor: SyncOp, metered: SyncOp) -> list[Variant]:
    """The hand-written ``floor`` (described by ``label``) and metered's Ledger next to it."""
    return [
        Variant("floor", label, sync_runner(floor)),
        Variant("metered", "metered Ledger", sync_runner(metered), "floor"),
    ]


def async_floor_and_metered(
    loop: asyncio.AbstractEventLoop, label: str, floor: AsyncOp, metered: AsyncOp
) -> list[Variant]:
    """The same for the async floor and metered's AsyncLedger, on ``loop``."""
    return [
        Variant("floor-async", label, async_runner(loop, floor)),
        Variant("metered-async", "metered AsyncLedger", async_runner(loop, metered), "floor-async"),
    ]


def measure_groups(
    backend: str,
    groups: dict[str, list[Variant]],
    args: argparse.Namespace,
    log: Callable[[str], None],
    after_warmup: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`measure` each operation's variants, one operation after the other; their rows."""
    rows = []
    for operation, variants in groups.items():
        log(f"{backend}: {operation} ...")
        measure(
            variants,
            ops=args.ops,
            rounds=args.rounds,
            warmup=args.warmup,
            after_warmup=after_warmup,
        )
        rows += summarize(backend, operation, variants)
    return rows


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    index = max(0, min(len(sorted_ns) - 1, math.ceil(q * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1000


def summarize(backend: str, operation: str, variants: list[Variant]) -> list[dict[str, Any]]:
    by_impl: dict[str, dict[str, Any]] = {}
    rows = []
    for variant in variants:
        data = sorted(variant.samples)
        row: dict[str, Any] = {
            "backend": backend,
            "operation": operation,
            "impl": variant.impl,
            "label": variant.label,
            "n": len(data),
            "mean_us": sum(data) / len(data) / 1000,
            "p50_us": percentile(data, 0.50),
            "p99_us": percentile(data, 0.99),
            "baseline": variant.baseline,
            "ratio_mean": None,
            "ratio_p50": None,
            "target": None,
            "meets_target": None,
        }
        by_impl[variant.impl] = row
        rows.append(row)
    for row in rows:
        base = by_impl.get(row["baseline"]) if row["baseline"] else None
        if base is None:
            continue
        row["ratio_mean"] = row["mean_us"] / base["mean_us"]
        row["ratio_p50"] = row["p50_us"] / base["p50_us"]
        if row["impl"] == "metered":
            target = TARGETS.get((backend, operation))
            if target is not None:
                row["target"] = target
                row["meets_target"] = row["ratio_p50"] <= target
    return rows


# --------------------------------------------------------------------------- metered ops


def metered_ops(ledger: Ledger, subjects: dict[str, str]) -> dict[str, SyncOp]:
    consume_subject, rc_subject, check_subject = (
        subjects["consume"],
        subjects["reserve+commit"],
        subjects["check"],
    )

    def consume(i: int) -> None:
        result = ledger.consume(consume_subject, 1, feature=FEATURE, key=f"c{i}")
        if not result.ok or result.replayed:
            raise BenchError(f"metered consume: {result!r}")

    def reserve_commit(i: int) -> None:
        held = ledger.reserve(rc_subject, 1, feature=FEATURE, key=f"r{i}", ttl=TTL_S)
        result = ledger.commit(held)
        if not result.ok or result.replayed:
            raise BenchError(f"metered commit: {result!r}")

    def check(i: int) -> None:
        if not ledger.check(check_subject, FEATURE).allowed:
            raise BenchError("metered check: not allowed")

    return {"consume": consume, "reserve+commit": reserve_commit, "check": check}


def metered_async_consume(ledger: AsyncLedger, subject: str) -> AsyncOp:
    async def consume(i: int) -> None:
        result = await ledger.consume(subject, 1, feature=FEATURE, key=f"c{i}")
        if not result.ok or result.replayed:
            raise BenchError(f"metered async consume: {result!r}")

    return consume


def prepare_subjects(ledger: Ledger, subjects: list[str]) -> None:
    """Give each subject the bench plan and a live account row (via metered itself)."""
    for subject in subjects:
        ledger.assign_plan(subject, PLAN)
        if not ledger.consume(subject, 1, feature=FEATURE, key="setup").ok:
            raise BenchError(f"setup consume for {subject!r} failed")


def subject_names(impl: str) -> dict[str, str]:
    return {op: f"{impl}-{op.replace('+', '-')}" for op in OPERATIONS}


# --------------------------------------------------------------------------- SQLite floor

# The ledger's own column layout; ``available`` is what metered calls usage_remaining.
_AVAILABLE = "allowance - used + credit - held"

# One autocommit statement per operation, as metered runs them: the conditional insert (or
# settle) of the operation row, whose triggers (the ones metered puts on its connections,
# _create_account_triggers) update the account row in the same statement.
SQLITE_CONSUME = f"""
INSERT INTO metered_operations (subject, id, key, feature, kind, state, units, charged,
    from_allowance, from_credit, overage, remaining_after, created_at)
SELECT subject, ?2, ?3, feature, 'consume', 'committed', ?1, ?1, ?1, 0, 0, {_AVAILABLE} - ?1, ?5
FROM metered_accounts
WHERE subject = ?4 AND feature = ?6 AND recheck_at > ?5 AND {_AVAILABLE} >= ?1
ON CONFLICT (subject, key) WHERE key IS NOT NULL DO NOTHING
RETURNING remaining_after"""
SQLITE_RESERVE = f"""
INSERT INTO metered_operations (subject, id, key, feature, kind, state, units, charged,
    from_allowance, from_credit, overage, remaining_after, created_at, expires_at)
SELECT subject, ?2, ?3, feature, 'reserve', 'held', ?1, NULL, 0, 0, 0, {_AVAILABLE} - ?1, ?5, ?7
FROM metered_accounts
WHERE subject = ?4 AND feature = ?6 AND recheck_at > ?5 AND {_AVAILABLE} >= ?1
ON CONFLICT (subject, key) WHERE key IS NOT NULL DO NOTHING
RETURNING remaining_after"""
SQLITE_COMMIT = """
UPDATE metered_operations SET state = 'committed', charged = units, from_allowance = units,
    settled_at = ?3
WHERE subject = ?1 AND id = ?2 AND state = 'held' AND expires_at > ?3
RETURNING remaining_after"""
# The account row carries the subscription status too: one primary-key read answers check.
CHECK_SELECT = """
SELECT plan, status, period_end, entitled, overage_allowed, allowance, used, credit, held,
    access_until, recheck_at
FROM metered_accounts WHERE subject = {subject} AND feature = {feature}"""
SQLITE_CHECK = CHECK_SELECT.format(feature="?2", subject="?1")


CheckTuple = tuple[bool, int, int, str, int]


def check_answer(row: Any) -> CheckTuple:
    """What check answers (allowed, usage_remaining, limit, plan, period_end), by hand."""
    plan, status, period_end, entitled, overage_ok, allowance, used, credit, held, until, rc = row
    now = now_us()
    remaining = max(max(allowance - used, 0) + credit - held, 0) if entitled else 0
    allowed = (
        status in ("active", "trialing")
        and (until is None or until > now)
        and rc > now
        and (remaining > 0 or bool(overage_ok))
    )
    if not allowed:
        raise BenchError("floor check: not allowed")
    return allowed, remaining, allowance, plan, period_end


def sqlite_connect(path: str) -> sqlite3.Connection:
    """A connection with the ledger's pragmas (WAL, synchronous=NORMAL) and its triggers."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    _create_account_triggers(conn)
    return conn


def sqlite_floor_ops(conn: sqlite3.Connection, subjects: dict[str, str]) -> dict[str, SyncOp]:
    ids = itertools.count(1)
    ex = conn.execute
    consume_subject, rc_subject, check_subject = (
        subjects["consume"],
        subjects["reserve+commit"],
        subjects["check"],
    )

    def consume(i: int) -> int:
        now = now_us()
        rows = ex(SQLITE_CONSUME, (1, next(ids), f"c{i}", consume_subject, now, FEATURE)).fetchall()
        if not rows:
            raise BenchError("floor consume: denied or key replayed")
        return int(rows[0][0])

    def reserve(i: int) -> int:
        now = now_us()
        op_id = next(ids)
        expires = now + TTL_S * 1_000_000
        rows = ex(SQLITE_RESERVE, (1, op_id, f"r{i}", rc_subject, now, FEATURE, expires)).fetchall()
        if not rows:
            raise BenchError("floor reserve: denied or key replayed")
        return op_id

    def commit(op_id: int) -> int:
        rows = ex(SQLITE_COMMIT, (rc_subject, op_id, now_us())).fetchall()
        if not rows:
            raise BenchError("floor commit: no held reservation")
        return int(rows[0][0])

    def reserve_commit(i: int) -> None:
        commit(reserve(i))

    def check(i: int) -> CheckTuple:
        return check_answer(ex(SQLITE_CHECK, (check_subject, FEATURE)).fetchone())

    return {"consume": consume, "reserve+commit": reserve_commit, "check": check}


def bench_sqlite(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    tmp = tempfile.TemporaryDirectory(prefix="metered-bench-")
    paths = {name: str(Path(tmp.name) / f"{name}.db") for name in ("floor", "metered", "async")}
    ledger = async_ledger = floor_conn = None
    loop = asyncio.new_event_loop()  # one loop for the whole backend (Python 3.10: no Runner)
    worker = ThreadPoolExecutor(max_workers=1)  # for the async floor
    try:
        # Schema and account rows: created by metered on every file (the floor reuses them).
        for name, path in paths.items():
            with Ledger(f"sqlite:///{path}", plans=PLANS) as setup:
                setup.create_schema()
                prepare_subjects(setup, list(subject_names(name).values()))

        floor_conn = sqlite_connect(paths["floor"])
        floor = sqlite_floor_ops(floor_conn, subject_names("floor"))
        ledger = Ledger(f"sqlite:///{paths['metered']}", plans=PLANS)
        metered = metered_ops(ledger, subject_names("metered"))
        async_ledger = AsyncLedger(f"sqlite:///{paths['async']}", plans=PLANS)
        async_consume = metered_async_consume(async_ledger, subject_names("async")["consume"])

        # The async floor: the hand-written consume on a worker thread, as AsyncLedger does.
        async def floor_async_consume(i: int) -> object:
            return await asyncio.get_running_loop().run_in_executor(
                worker, floor["consume"], 1_000_000_000 + i
            )

        label = "stdlib sqlite3, by hand"
        groups = {
            "consume": floor_and_metered(label, floor["consume"], metered["consume"])
            + async_floor_and_metered(
                loop, "sqlite3 on a worker thread", floor_async_consume, async_consume
            ),
            "reserve+commit": floor_and_metered(
                label, floor["reserve+commit"], metered["reserve+commit"]
            ),
            "check": floor_and_metered(label, floor["check"], metered["check"]),
        }
        return measure_groups("sqlite", groups, args, log)
    finally:
        worker.shutdown()
        if async_ledger is not None:
            loop.run_until_complete(async_ledger.close())
        loop.close()
        if ledger is not None:
            ledger.close()
        if floor_conn is not None:
            floor_conn.close()
        tmp.cleanup()


# --------------------------------------------------------------------------- PostgreSQL floor

# One statement per operation: lock the account row, decide, insert the operation row only
# when the balance covers it (the key's unique index arbitrates replays), and update the
# account only when the insert happened.
PG_CONSUME = f"""
WITH a AS (
    SELECT {_AVAILABLE} AS available FROM metered_accounts
    WHERE subject = %(subject)s AND feature = %(feature)s AND recheck_at > %(now)s
    FOR UPDATE),
i AS (
    INSERT INTO metered_operations (subject, id, key, feature, kind, state, units, charged,
        from_allowance, from_credit, overage, remaining_after, created_at)
    SELECT %(subject)s, %(id)s, %(key)s, %(feature)s, 'consume', 'committed', %(units)s,
        %(units)s, %(units)s, 0, 0, available - %(units)s, %(now)s
    FROM a WHERE available >= %(units)s
    ON CONFLICT (subject, key) DO NOTHING
    RETURNING 1),
u AS (
    UPDATE metered_accounts SET used = used + %(units)s, updated_at = %(now)s
    WHERE subject = %(subject)s AND feature = %(feature)s AND EXISTS (SELECT 1 FROM i))
SELECT available - %(units)s, EXISTS (SELECT 1 FROM i) FROM a"""
PG_RESERVE = f"""
WITH a AS (
    SELECT {_AVAILABLE} AS available FROM metered_accounts
    WHERE subject = %(subject)s AND feature = %(feature)s AND recheck_at > %(now)s
    FOR UPDATE),
i AS (
    INSERT INTO metered_operations (subject, id, key, feature, kind, state, units, charged,
        from_allowance, from_credit, overage, created_at, expires_at)
    SELECT %(subject)s, %(id)s, %(key)s, %(feature)s, 'reserve', 'held', %(units)s, NULL,
        0, 0, 0, %(now)s, %(expires_at)s
    FROM a WHERE available >= %(units)s
    ON CONFLICT (subject, key) DO NOTHING
    RETURNING 1),
u AS (
    UPDATE metered_accounts SET held = held + %(units)s,
        recheck_at = LEAST(recheck_at, %(expires_at)s), updated_at = %(now)s
    WHERE subject = %(subject)s AND feature = %(feature)s AND EXISTS (SELECT 1 FROM i))
SELECT available - %(units)s, EXISTS (SELECT 1 FROM i) FROM a"""
PG_COMMIT = f"""
WITH o AS (
    UPDATE metered_operations SET state = 'committed', charged = units, from_allowance = units,
        settled_at = %(now)s
    WHERE subject = %(subject)s AND id = %(id)s AND state = 'held' AND expires_at > %(now)s
    RETURNING units),
u AS (
    UPDATE metered_accounts AS m SET used = m.used + o.units, held = m.held - o.units,
        updated_at = %(now)s
    FROM o WHERE m.subject = %(subject)s AND m.feature = %(feature)s
    RETURNING {_AVAILABLE.replace("allowance", "m.allowance")})
SELECT * FROM u"""
PG_CHECK = CHECK_SELECT.format(feature="%(feature)s", subject="%(subject)s")


class PgFloor:
    """The single-statement floor on one held psycopg connection (sync or async)."""

    def __init__(self, subjects: dict[str, str]) -> None:
        self.subjects = subjects
        self.ids = itertools.count(1)

    def consume_params(self, i: int) -> dict[str, Any]:
        return {
            "subject": self.subjects["consume"],
            "feature": FEATURE,
            "units": 1,
            "key": f"c{i}",
            "id": next(self.ids),
            "now": now_us(),
        }

    def reserve_params(self, i: int) -> dict[str, Any]:
        now = now_us()
        return {
            "subject": self.subjects["reserve+commit"],
            "feature": FEATURE,
            "units": 1,
            "key": f"r{i}",
            "id": next(self.ids),
            "now": now,
            "expires_at": now + TTL_S * 1_000_000,
        }

    def commit_params(self, op_id: int) -> dict[str, Any]:
        return {
            "subject": self.subjects["reserve+commit"],
            "feature": FEATURE,
            "id": op_id,
            "now": now_us(),
        }

    @staticmethod
    def applied(row: Any, what: str) -> None:
        if row is None or not row[-1]:
            raise BenchError(f"floor {what}: not applied ({row!r})")

    def sync_ops(self, conn: Any) -> dict[str, SyncOp]:
        cur = conn.cursor()
        check_params = {"subject": self.subjects["check"], "feature": FEATURE}

        def consume(i: int) -> None:
            self.applied(cur.execute(PG_CONSUME, self.consume_params(i)).fetchone(), "consume")

        def reserve_commit(i: int) -> None:
            params = self.reserve_params(i)
            self.applied(cur.execute(PG_RESERVE, params).fetchone(), "reserve")
            row = cur.execute(PG_COMMIT, self.commit_params(params["id"])).fetchone()
            if row is None:
                raise BenchError("floor commit: no held reservation")

        def check(i: int) -> CheckTuple:
            return check_answer(cur.execute(PG_CHECK, check_params).fetchone())

        return {"consume": consume, "reserve+commit": reserve_commit, "check": check}

    def async_consume(self, conn: Any) -> AsyncOp:
        cur = conn.cursor()

        async def consume(i: int) -> None:
            await cur.execute(PG_CONSUME, self.consume_params(i))
            self.applied(await cur.fetchone(), "async consume")

        return consume


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote('-csearch_path=' + schema)}"


@contextlib.contextmanager
def pg_schema(base: str, meta: dict[str, Any] | None = None) -> Iterator[str]:
    """A throwaway schema on the server at ``base``; yields a URL whose search_path is it."""
    import psycopg

    schema = "bench_" + uuid.uuid4().hex[:12]
    with psycopg.connect(base, autocommit=True, connect_timeout=5) as admin:
        if meta is not None:
            meta["postgresql"] = admin.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(base, schema)
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def pg_unavailable(url: str) -> str | None:
    """Why PostgreSQL cannot be benchmarked at ``url``, or None when it can."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    try:
        with psycopg.connect(url, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        return f"cannot connect to {url}: {' '.join(str(exc).split())}"
    return None


def pg_analyze(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE metered_subjects, metered_accounts, metered_operations")


def bench_postgres(
    args: argparse.Namespace, log: Callable[[str], None], meta: dict[str, Any]
) -> list[dict[str, Any]]:
    with pg_schema(args.pg_url, meta) as url:
        return _bench_postgres(args, log, url)


def _bench_postgres(
    args: argparse.Namespace, log: Callable[[str], None], url: str
) -> list[dict[str, Any]]:
    import psycopg

    asyncpg_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    loop = asyncio.new_event_loop()  # one loop for the whole backend (Python 3.10: no Runner)
    ledger = async_ledger = asyncpg_ledger = floor_conn = floor_aconn = None
    try:
        with Ledger(url, plans=PLANS) as setup:
            setup.create_schema()
            prepare_subjects(
                setup,
                [
                    s
                    for impl in ("floor", "metered", "async", "asyncpg", "afloor")
                    for s in subject_names(impl).values()
                ],
            )
        floor_conn = psycopg.connect(url, autocommit=True)
        floor_aconn = loop.run_until_complete(psycopg.AsyncConnection.connect(url, autocommit=True))
        floor = PgFloor(subject_names("floor")).sync_ops(floor_conn)
        afloor = PgFloor(subject_names("afloor")).async_consume(floor_aconn)
        ledger = Ledger(url, plans=PLANS)
        metered = metered_ops(ledger, subject_names("metered"))
        async_ledger = AsyncLedger(url, plans=PLANS)
        async_consume = metered_async_consume(async_ledger, subject_names("async")["consume"])
        variants_consume = floor_and_metered(
            "raw psycopg, one CTE", floor["consume"], metered["consume"]
        ) + async_floor_and_metered(loop, "psycopg AsyncConnection", afloor, async_consume)
        if not args.no_asyncpg:
            try:
                import asyncpg  # noqa: F401
            except ImportError:
                log("postgres: asyncpg not installed; skipping the asyncpg row")
            else:
                asyncpg_ledger = AsyncLedger(asyncpg_url, plans=PLANS)
                variants_consume.append(
                    Variant(
                        "metered-asyncpg",
                        "metered AsyncLedger+asyncpg",
                        async_runner(
                            loop,
                            metered_async_consume(
                                asyncpg_ledger, subject_names("asyncpg")["consume"]
                            ),
                        ),
                        "floor-async",
                    )
                )
        groups = {
            "consume": variants_consume,
            "reserve+commit": floor_and_metered(
                "raw psycopg, one CTE", floor["reserve+commit"], metered["reserve+commit"]
            ),
            "check": floor_and_metered("raw psycopg, one SELECT", floor["check"], metered["check"]),
        }

        def analyze() -> None:
            # Table statistics as autovacuum keeps them on a live database: without them the
            # planner sees the freshly created (empty) tables and may cache a generic plan
            # that suits an empty table only. --no-analyze measures that cold state.
            if not args.no_analyze:
                pg_analyze(url)

        return measure_groups("postgres", groups, args, log, after_warmup=analyze)
    finally:
        for aledger in (async_ledger, asyncpg_ledger):
            if aledger is not None:
                loop.run_until_complete(aledger.close())
        if floor_aconn is not None:
            loop.run_until_complete(floor_aconn.close())
        loop.close()
        if ledger is not None:
            ledger.close()
        if floor_conn is not None:
            floor_conn.close()


# --------------------------------------------------------------------------- profile


def profile(args: argparse.Namespace, backend: str, log: Callable[[str], None]) -> None:
    """Run ``--ops`` metered operations under cProfile and print where the time goes."""
    import cProfile
    import pstats

    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="metered-bench-"))
            url = f"sqlite:///{tmp}/profile.db"
        else:
            url = stack.enter_context(pg_schema(args.pg_url))
        subjects = subject_names("metered")
        with Ledger(url, plans=PLANS) as setup:
            setup.create_schema()
            prepare_subjects(setup, list(subjects.values()))
        ledger = stack.enter_context(Ledger(url, plans=PLANS))
        op = metered_ops(ledger, subjects)[args.profile]
        for i in range(args.warmup):
            op(i)
        if backend == "postgres" and not args.no_analyze:
            pg_analyze(url)
        log(f"{backend}: profiling {args.ops} x {args.profile} ...")
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(args.warmup, args.warmup + args.ops):
            op(i)
        profiler.disable()
        print(f"== {backend}: {args.ops} x metered {args.profile}, by own time")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(args.profile_top)


# --------------------------------------------------------------------------- output


def render_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'backend':<9}{'operation':<16}{'implementation':<30}"
        f"{'mean':>8}{'p50':>8}{'p99':>8}{'r(mean)':>9}{'r(p50)':>9}  target"
    )
    lines = [header, "-" * (len(header) + 6)]
    previous = None
    for row in rows:
        group = (row["backend"], row["operation"])
        if previous is not None and group != previous:
            lines.append("")
        previous = group
        ratio = f"{row['ratio_mean']:.2f}x" if row["ratio_mean"] is not None else ""
        ratio50 = f"{row['ratio_p50']:.2f}x" if row["ratio_p50"] is not None else ""
        if row["target"] is not None:
            verdict = "ok" if row["meets_target"] else "MISSED"
            target = f"<= {row['target']:.2f}x {verdict}"
        elif row["baseline"] == "floor-async":
            target = "(info, vs async floor)"
        else:
            target = ""
        lines.append(
            f"{row['backend']:<9}{row['operation']:<16}{row['label']:<30}"
            f"{row['mean_us']:>8.1f}{row['p50_us']:>8.1f}{row['p99_us']:>8.1f}"
            f"{ratio:>9}{ratio50:>9}  {target}".rstrip()
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
    }
    for dist in ("metered-billing", "psycopg", "psycopg-pool", "asyncpg", "pydantic"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "all"), default="all")
    parser.add_argument(
        "--ops", type=int, default=3000, help="timed operations per row (default 3000)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=20,
        help="alternating batches the timed operations are split into (default 20)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed operations per row first (default ops/8)"
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("METERED_TEST_POSTGRES_URL") or DEFAULT_PG_URL,
        help="PostgreSQL URL (default $METERED_TEST_POSTGRES_URL or %(default)s)",
    )
    parser.add_argument("--no-asyncpg", action="store_true", help="skip the asyncpg row")
    parser.add_argument(
        "--no-analyze",
        action="store_true",
        help="PostgreSQL: do not ANALYZE the tables after the warm-up (cold planner statistics)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--profile",
        choices=OPERATIONS,
        help="instead of the table: run --ops metered operations under cProfile and print"
        " the functions with the most own time",
    )
    parser.add_argument("--profile-top", type=int, default=25, help=argparse.SUPPRESS)
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target is missed"
    )
    args = parser.parse_args(argv)
    if args.ops < 1 or args.rounds < 1:
        parser.error("--ops and --rounds must be positive")
    if args.warmup is None:
        args.warmup = max(100, args.ops // 8)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    skipped: dict[str, str] = {}
    if args.backend in ("postgres", "all"):
        reason = pg_unavailable(args.pg_url)
        if reason is not None:
            if args.backend == "postgres":
                log(f"error: {reason}")
                return 2
            skipped["postgres"] = reason

    if args.profile:
        for backend in ("sqlite", "postgres"):
            if args.backend in (backend, "all") and backend not in skipped:
                profile(args, backend, log)
        return 0

    meta = environment()
    meta["load_before"] = os.getloadavg()[0]
    meta.update(ops=args.ops, rounds=args.rounds, warmup=args.warmup)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    if args.backend in ("sqlite", "all"):
        rows += bench_sqlite(args, log)
    if args.backend in ("postgres", "all"):
        if "postgres" in skipped:
            log(f"postgres: skipped: {skipped['postgres']}")
        else:
            rows += bench_postgres(args, log, meta)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["load_after"] = os.getloadavg()[0]

    if args.json:
        json.dump({"environment": meta, "results": rows, "skipped": skipped}, sys.stdout, indent=2)
        print()
    else:
        print(
            f"metered ledger benchmark: {args.ops} timed ops per row in {args.rounds} alternating"
            f" batches after {args.warmup} warm-up ops; 1 unit and a fresh key per op;"
            " times in microseconds"
        )
        versions = ", ".join(
            f"{name} {meta[key]}"
            for name, key in (
                ("Python", "python"),
                ("SQLite", "sqlite"),
                ("PostgreSQL", "postgresql"),
                ("psycopg", "psycopg"),
                ("pydantic", "pydantic"),
            )
            if meta.get(key)
        )
        print(f"{versions}; {meta['cpus']} CPUs; {meta['platform']}")
        print(
            "r(mean), r(p50) = metered / floor on means and on medians; targets are judged on"
            " medians\n(SQLite's WAL checkpoints and PostgreSQL's commit fsyncs put rare"
            " millisecond stalls into both sides' means)"
        )
        if meta["load_before"] > 1.0:
            print(
                f"warning: the machine was busy (load average {meta['load_before']:.2f});"
                " expect noisy times"
            )
        print()
        print(render_table(rows))
        for backend, reason in skipped.items():
            print(f"\n{backend}: skipped: {reason}")
        print(f"\n({meta['seconds']} s)")
    missed = [r for r in rows if r["meets_target"] is False]
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
