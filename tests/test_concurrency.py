"""Races on one subject's balance: threads, processes and asyncio tasks, SQLite and PostgreSQL.

Every test spends a small allowance (200 units, 1..7 at a time) from many workers at once and
then proves, from the results the workers saw and from the ledger's own history, that:

* exactly the allowance was spent, never more (a watcher polls the balance during the run);
* every successful call's ``usage_remaining`` fits one serial order of the calls (the
  "chain" check below), so no two calls saw the same units;
* every denial names the right reason (``quota_exhausted`` when nothing is left,
  ``insufficient_units`` otherwise) and a ``usage_remaining`` that really existed;
* the same idempotency key fired from many threads and processes at once charges once.

Processes use the ``spawn`` start method and build their own ``Ledger`` from the URL.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

from metered import AsyncLedger, Ledger, OperationInProgress, Plan, Reservation

ALLOWANCE = 200
FEATURE = "api_calls"
SUBJECT = "org_hot"
PLANS = [Plan("hot", features={FEATURE: ALLOWANCE}), Plan("roomy", features={FEATURE: 10**9})]
MAX_CALLS = 3000
"""Per worker: a guard against a livelock, far above what a correct run needs."""
TIMEOUT = 90.0
"""Generous wall-clock limit for barriers, queues and joins (CI machines are slow)."""
HOLD_TTL = 600
"""Reservations here must not expire mid-test, however slow the machine."""

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


class Outcome(NamedTuple):
    """What one worker saw from one call (picklable, so processes can send it back)."""

    action: str
    """``consume``, ``reserve``, ``commit`` or ``release``."""
    units: int
    ok: bool
    consumed: int
    usage_remaining: int
    reason: str | None
    replayed: bool
    entry_id: int | None


def make_ledger(url: str, *, pool_size: int = 4) -> Ledger:
    return Ledger(url, plans=PLANS, default_plan="hot", pool_size=pool_size)


def make_async_ledger(url: str, driver: str | None, *, pool_size: int = 16) -> AsyncLedger:
    if driver == "asyncpg":
        url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    return AsyncLedger(url, plans=PLANS, default_plan="hot", pool_size=pool_size)


@pytest.fixture
def hot_ledger(database_url: str) -> Iterator[Ledger]:
    """The parent's ledger on a fresh database, the subject already on the ``hot`` plan."""
    ledger = make_ledger(database_url, pool_size=20)
    ledger.create_schema()
    ledger.assign_plan(SUBJECT, "hot")
    try:
        yield ledger
    finally:
        ledger.close()


# --------------------------------------------------------------------------- workloads


def _outcome(action: str, units: int, result: Any) -> Outcome:
    return Outcome(
        action,
        units,
        result.ok,
        result.consumed,
        result.usage_remaining,
        result.reason,
        result.replayed,
        getattr(result, "entry_id", None) if action != "reserve" else result.id,
    )


def spend_consume(ledger: Ledger, seed: int) -> list[Outcome]:
    """Consume 1..7 units at a time until the balance says nothing is left."""
    rng = random.Random(seed)
    seen: list[Outcome] = []
    for _ in range(MAX_CALLS):
        units = rng.randint(1, 7)
        result = ledger.consume(SUBJECT, units, feature=FEATURE)
        seen.append(_outcome("consume", units, result))
        if not result.ok and result.reason == "quota_exhausted":
            return seen
    raise AssertionError(f"worker {seed} never saw the balance run out")


def spend_mixed(ledger: Ledger, seed: int) -> list[Outcome]:
    """Consume, or reserve and then commit (the same, fewer or more units) or release.

    Stops once a call is refused with ``quota_exhausted`` and the whole allowance is used
    (holds of other workers may still come back before that).
    """
    rng = random.Random(seed)
    seen: list[Outcome] = []
    for _ in range(MAX_CALLS):
        units = rng.randint(1, 7)
        action = rng.choice(["consume", "commit", "commit_less", "commit_more", "release"])
        if action == "consume":
            result: Any = ledger.consume(SUBJECT, units, feature=FEATURE)
            seen.append(_outcome("consume", units, result))
        else:
            reservation = ledger.reserve(SUBJECT, units, feature=FEATURE, ttl=HOLD_TTL)
            result = reservation
            seen.append(_outcome("reserve", units, reservation))
            if reservation.ok:
                if action == "release":
                    released = ledger.release(reservation)
                    seen.append(Outcome("release", units, released, 0, 0, None, False, None))
                else:
                    final = {
                        "commit": units,
                        "commit_less": rng.randint(0, units - 1),
                        "commit_more": units + rng.randint(1, 4),
                    }[action]
                    committed = ledger.commit(reservation, units=final)
                    seen.append(_outcome("commit", final, committed))
                    if not committed.ok:
                        released = ledger.release(reservation)
                        seen.append(Outcome("release", units, released, 0, 0, None, False, None))
        if (
            not result.ok
            and result.reason == "quota_exhausted"
            and ledger.balance(SUBJECT, FEATURE).used == ALLOWANCE
        ):
            return seen
    raise AssertionError(f"worker {seed} never saw the allowance used up")


WORKLOADS: dict[str, Callable[[Ledger, int], list[Outcome]]] = {
    "consume": spend_consume,
    "mixed": spend_mixed,
}


# --------------------------------------------------------------------------- checks


def check_outcomes(outcomes: list[Outcome], *, pure_consume: bool) -> None:
    """What the workers saw is consistent with one serial order of their calls."""
    spent = [o for o in outcomes if o.ok and o.action in ("consume", "commit")]
    assert sum(o.consumed for o in spent) == ALLOWANCE
    for o in outcomes:
        assert o.usage_remaining >= 0
        assert not o.replayed
        if o.action in ("consume", "commit") and o.ok:
            assert o.consumed == o.units
            assert o.entry_id is not None
        if o.action in ("consume", "reserve") and not o.ok:
            assert o.reason in ("quota_exhausted", "insufficient_units"), o
            assert o.usage_remaining < o.units, o
            assert (o.reason == "quota_exhausted") == (o.usage_remaining == 0), o
        if o.action == "commit" and not o.ok:
            assert o.reason == "insufficient_units", o
            assert o.usage_remaining < o.units, o
        if o.action == "release":
            assert o.ok, "releasing a live reservation must give its units back"
    if not pure_consume:
        return
    # With consumes only, available units only go down, one call at a time: ordered by what
    # was left after them, every success must start exactly where the previous one ended.
    states = [ALLOWANCE]
    for o in sorted(spent, key=lambda o: o.usage_remaining, reverse=True):
        assert o.usage_remaining + o.consumed == states[-1], "two calls saw the same units"
        states.append(o.usage_remaining)
    assert states[-1] == 0
    for o in outcomes:
        if not o.ok:
            assert o.usage_remaining in states, f"denied with a balance that never existed: {o}"


def all_history(ledger: Ledger, subject: str = SUBJECT) -> list[Any]:
    """Every history line of a subject (newest first), paging through ``before``."""
    lines: list[Any] = []
    before = None
    while True:
        page = ledger.history(subject, limit=1000, before=before)
        if not page:
            return lines
        lines.extend(page)
        before = page[-1].id


def check_ledger(ledger: Ledger, outcomes: list[Outcome]) -> None:
    """The ledger agrees with the workers: allowance spent exactly, history line by line."""
    balance = ledger.balance(SUBJECT, FEATURE)
    assert (balance.used, balance.held, balance.usage_remaining) == (ALLOWANCE, 0, 0)
    assert (balance.credits, balance.overage) == (0, 0)
    check = ledger.check(SUBJECT, FEATURE)
    assert (check.allowed, check.reason, check.usage_remaining) == (False, "quota_exhausted", 0)

    history = [line for line in all_history(ledger) if line.kind in ("consume", "reserve")]
    charged = [line for line in history if line.state == "committed"]
    assert sum(line.charged for line in charged) == ALLOWANCE
    assert sum(line.from_allowance for line in charged) == ALLOWANCE
    assert all(line.from_credit == 0 and line.overage == 0 for line in charged)
    assert not [line for line in history if line.state == "held"]
    spent_ids = sorted(o.entry_id for o in outcomes if o.ok and o.action in ("consume", "commit"))
    assert sorted(line.id for line in charged) == spent_ids
    reserved = sorted(o.entry_id for o in outcomes if o.ok and o.action == "reserve")
    assert sorted(line.id for line in history if line.kind == "reserve") == reserved
    releases = sum(1 for o in outcomes if o.action == "release")
    assert sum(1 for line in history if line.state == "released") == releases
    assert len({line.id for line in history}) == len(history)


class Watcher:
    """Polls the balance while workers run: never more than the allowance used or held."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.stop = threading.Event()
        self.samples = 0
        self.violations: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            b = self.ledger.balance(SUBJECT, FEATURE)
            self.samples += 1
            if b.used + b.held > ALLOWANCE or b.held < 0 or b.used < 0:
                self.violations.append(f"used={b.used} held={b.held}")
            if b.usage_remaining != ALLOWANCE - b.used - b.held:
                self.violations.append(f"remaining={b.usage_remaining} used={b.used} held={b.held}")
            self.stop.wait(0.002)

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(TIMEOUT)
        assert not self.violations, self.violations[:5]


# --------------------------------------------------------------------------- runners


def run_threads(target: Callable[[int], Any], count: int) -> list[Any]:
    """Run ``target(i)`` on ``count`` threads released together; re-raise the first failure."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            barrier.wait(TIMEOUT)
            results[index] = target(index)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


def _process_main(
    queue: Any, index: int, barrier: Any, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    """Entry point of a spawned worker: run ``fn(*args)`` once all workers are up."""
    try:
        barrier.wait(TIMEOUT)
        queue.put((index, True, fn(*args)))
    except BaseException:
        queue.put((index, False, traceback.format_exc()))


def run_processes(
    fn: Callable[..., Any],
    args: list[tuple[Any, ...]],
    *,
    threads: Callable[[int], Any] | None = None,
    thread_count: int = 0,
) -> tuple[list[Any], list[Any]]:
    """Run ``fn(*args[i])`` in spawned processes (and optionally ``threads(i)`` in this one),
    all released by one barrier. Returns (process results, thread results)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args) + thread_count)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_process_main, args=(queue, i, barrier, fn, a), daemon=True)
        for i, a in enumerate(args)
    ]
    for proc in procs:
        proc.start()
    try:
        thread_results: list[Any] = []
        if threads is not None:

            def in_thread(i: int) -> Any:
                barrier.wait(TIMEOUT)
                return threads(i)

            thread_results = run_threads_unsynchronised(in_thread, thread_count)
        results: list[Any] = [None] * len(procs)
        failures = []
        for _ in procs:
            index, ok, value = queue.get(timeout=TIMEOUT)
            if ok:
                results[index] = value
            else:
                failures.append(value)
        assert not failures, failures[0]
        return results, thread_results
    finally:
        for proc in procs:
            proc.join(TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join()


def run_threads_unsynchronised(target: Callable[[int], Any], count: int) -> list[Any]:
    """Like :func:`run_threads`, for targets that wait on a barrier of their own."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            results[index] = target(index)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in pool), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


def process_spend(url: str, workload: str, seed: int) -> list[Outcome]:
    """A spawned worker: its own Ledger from the URL, then the workload."""
    with make_ledger(url, pool_size=2) as ledger:
        return WORKLOADS[workload](ledger, seed)


# --------------------------------------------------------------------------- (a) threads


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
@pytest.mark.parametrize("workload", ["consume", "mixed"])
def test_threads_spend_exactly_the_allowance(hot_ledger: Ledger, workload: str) -> None:
    spend = WORKLOADS[workload]
    with Watcher(hot_ledger):
        per_thread = run_threads(lambda i: spend(hot_ledger, 1000 + i), 16)
    outcomes = [o for seen in per_thread for o in seen]
    check_outcomes(outcomes, pure_consume=workload == "consume")
    check_ledger(hot_ledger, outcomes)


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_expiring_abandoned_holds_never_starve_live_requests(hot_ledger: Ledger) -> None:
    """Holds left to expire (as dead workers leave them) keep the account due for a recheck.

    Every request must still be served: an operation that tidies up expired holds and then
    finds yet another one expired must not give up with ``LedgerUnavailable``.
    """
    subject = "org_churn"
    hot_ledger.assign_plan(subject, "roomy")
    ttl = 0.02

    def work(seed: int) -> int:
        rng = random.Random(seed)
        consumed = 0
        for _ in range(15):
            if rng.random() < 0.5:
                assert hot_ledger.reserve(subject, 1, feature=FEATURE, ttl=ttl).ok  # abandoned
            else:
                assert hot_ledger.consume(subject, 1, feature=FEATURE).ok
                consumed += 1
        return consumed

    consumed = sum(run_threads(work, 16))
    time.sleep(ttl * 3)  # past every TTL
    balance = hot_ledger.balance(subject, FEATURE)
    assert (balance.used, balance.held) == (consumed, 0)
    lines = [line for line in all_history(hot_ledger, subject) if line.kind == "consume"]
    assert sum(line.charged for line in lines) == consumed


# --------------------------------------------------------------------------- (b) processes


@pytest.mark.slow
@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
@pytest.mark.parametrize("workload", ["consume", "mixed"])
def test_processes_spend_exactly_the_allowance(
    hot_ledger: Ledger, database_url: str, workload: str
) -> None:
    with Watcher(hot_ledger):
        per_process, _ = run_processes(
            process_spend, [(database_url, workload, 2000 + i) for i in range(8)]
        )
    outcomes = [o for seen in per_process for o in seen]
    check_outcomes(outcomes, pure_consume=workload == "consume")
    check_ledger(hot_ledger, outcomes)


# --------------------------------------------------------------------------- (c) one key


def fire_key(ledger: Ledger, action: str, units: int, key: str) -> tuple[Any, ...]:
    """One call with a shared key: ("ok", result) or ("in_progress", None)."""
    try:
        if action == "consume":
            return ("ok", ledger.consume(SUBJECT, units, feature=FEATURE, key=key))
        return ("ok", ledger.reserve(SUBJECT, units, feature=FEATURE, key=key, ttl=HOLD_TTL))
    except OperationInProgress:
        return ("in_progress", None)


def process_fire_key(url: str, action: str, units: int, key: str) -> tuple[Any, ...]:
    with make_ledger(url, pool_size=1) as ledger:
        return fire_key(ledger, action, units, key)


def fire_everywhere(
    ledger: Ledger, url: str, action: str, units: int, key: str
) -> list[tuple[Any, ...]]:
    """The same call from 8 spawned processes and 16 threads, released together."""
    from_processes, from_threads = run_processes(
        process_fire_key,
        [(url, action, units, key)] * 8,
        threads=lambda i: fire_key(ledger, action, units, key),
        thread_count=16,
    )
    return from_processes + from_threads


PRIOR_SPEND = 60
BIG = 100
"""After PRIOR_SPEND, the balance covers one call of BIG units and not two: a request that
loses the race for the key must be answered from the key, not denied for lack of units."""


@pytest.mark.slow
@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_same_key_consume_from_threads_and_processes_charges_once(
    hot_ledger: Ledger, database_url: str
) -> None:
    assert hot_ledger.consume(SUBJECT, PRIOR_SPEND, feature=FEATURE).ok
    answers = fire_everywhere(hot_ledger, database_url, "consume", BIG, "charge-once")
    assert all(kind == "ok" for kind, _ in answers)
    results = [result for _, result in answers]
    originals = [r for r in results if not r.replayed]
    assert len(originals) == 1, [(r.ok, r.reason, r.replayed) for r in results]
    original = originals[0]
    assert original.ok and original.consumed == BIG
    left = ALLOWANCE - PRIOR_SPEND - BIG
    assert original.usage_remaining == left
    for r in results:
        assert (r.ok, r.consumed, r.entry_id, r.usage_remaining) == (
            True,
            BIG,
            original.entry_id,
            left,
        ), r

    balance = hot_ledger.balance(SUBJECT, FEATURE)
    assert (balance.used, balance.held) == (PRIOR_SPEND + BIG, 0)
    keyed = [line for line in all_history(hot_ledger) if line.key == "charge-once"]
    assert [(line.kind, line.state, line.charged) for line in keyed] == [
        ("consume", "committed", BIG)
    ]


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_same_key_race_repeated_on_threads(hot_ledger: Ledger) -> None:
    """The key race, many times over (cheap with threads): no loser is ever denied."""
    for round_ in range(10):
        subject = f"org_round_{round_}"
        assert hot_ledger.consume(subject, PRIOR_SPEND, feature=FEATURE).ok
        action = "consume" if round_ % 2 else "reserve"

        def fire(_: int, subject: str = subject, action: str = action) -> Any:
            try:
                if action == "consume":
                    return hot_ledger.consume(subject, BIG, feature=FEATURE, key="k")
                return hot_ledger.reserve(subject, BIG, feature=FEATURE, key="k", ttl=HOLD_TTL)
            except OperationInProgress:
                return "in_progress"

        answers = run_threads(fire, 16)
        results = [a for a in answers if a != "in_progress"]
        assert all(r.ok for r in results), [r.reason for r in results if not r.ok]
        assert sum(1 for r in results if not r.replayed) == 1
        if action == "reserve":
            assert len(results) == 1  # everybody else: in flight
        balance = hot_ledger.balance(subject, FEATURE)
        expected = (PRIOR_SPEND + BIG, 0) if action == "consume" else (PRIOR_SPEND, BIG)
        assert (balance.used, balance.held) == expected


@pytest.mark.slow
@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_same_key_reserve_from_threads_and_processes_holds_once(
    hot_ledger: Ledger, database_url: str
) -> None:
    assert hot_ledger.consume(SUBJECT, PRIOR_SPEND, feature=FEATURE).ok
    answers = fire_everywhere(hot_ledger, database_url, "reserve", BIG, "hold-once")
    held = [r for kind, r in answers if kind == "ok"]
    assert len(held) == 1, [(r.ok, r.reason, r.replayed) for r in held]
    assert sum(1 for kind, _ in answers if kind == "in_progress") == len(answers) - 1
    winner: Reservation = held[0]
    assert winner.ok and not winner.replayed and winner.units == BIG
    assert hot_ledger.balance(SUBJECT, FEATURE).held == BIG

    final = 80
    committed = hot_ledger.commit(winner, units=final)
    assert committed.ok and committed.consumed == final

    # Once committed, everybody firing the key again gets the original outcome, uncharged
    # (no race is left to lose here, so threads are enough).
    again = run_threads(lambda i: fire_key(hot_ledger, "reserve", BIG, "hold-once"), 16)
    assert all(kind == "ok" for kind, _ in again)
    for _, r in again:
        assert (r.ok, r.replayed, r.consumed, r.id) == (True, True, final, winner.id), r
        replay = hot_ledger.commit(r)
        assert (replay.ok, replay.replayed, replay.consumed) == (True, True, final)
    balance = hot_ledger.balance(SUBJECT, FEATURE)
    assert (balance.used, balance.held) == (PRIOR_SPEND + final, 0)
    keyed = [line for line in all_history(hot_ledger) if line.key == "hold-once"]
    assert [(line.kind, line.state, line.charged) for line in keyed] == [
        ("reserve", "committed", final)
    ]


# --------------------------------------------------------------------------- (d) asyncio

ASYNC_DRIVERS = [
    pytest.param("sqlite", None, id="sqlite"),
    pytest.param("postgres", "psycopg", id="pg-psycopg", marks=pytest.mark.postgres),
    pytest.param("postgres", "asyncpg", id="pg-asyncpg", marks=pytest.mark.postgres),
]


async def async_spend(ledger: AsyncLedger, seed: int) -> list[Outcome]:
    """The mixed workload on an AsyncLedger."""
    rng = random.Random(seed)
    seen: list[Outcome] = []
    for _ in range(MAX_CALLS):
        units = rng.randint(1, 7)
        action = rng.choice(["consume", "commit", "commit_less", "release"])
        if action == "consume":
            result: Any = await ledger.consume(SUBJECT, units, feature=FEATURE)
            seen.append(_outcome("consume", units, result))
        else:
            result = await ledger.reserve(SUBJECT, units, feature=FEATURE, ttl=HOLD_TTL)
            seen.append(_outcome("reserve", units, result))
            if result.ok:
                await asyncio.sleep(0)  # let other tasks in while the units are held
                if action == "release":
                    released = await ledger.release(result)
                    seen.append(Outcome("release", units, released, 0, 0, None, False, None))
                else:
                    final = units if action == "commit" else rng.randint(0, units - 1)
                    committed = await ledger.commit(result, units=final)
                    seen.append(_outcome("commit", final, committed))
        if not result.ok and result.reason == "quota_exhausted":
            if (await ledger.balance(SUBJECT, FEATURE)).used == ALLOWANCE:
                return seen
            await asyncio.sleep(0.001)
    raise AssertionError(f"task {seed} never saw the allowance used up")


@pytest.mark.parametrize(("database_url", "driver"), ASYNC_DRIVERS, indirect=["database_url"])
async def test_async_tasks_spend_exactly_the_allowance(
    database_url: str, driver: str | None
) -> None:
    async with make_async_ledger(database_url, driver) as ledger:
        await ledger.create_schema()
        await ledger.assign_plan(SUBJECT, "hot")
        per_task = await asyncio.gather(*(async_spend(ledger, 3000 + i) for i in range(48)))
        outcomes = [o for seen in per_task for o in seen]
        check_outcomes(outcomes, pure_consume=False)
    with make_ledger(database_url) as sync_view:
        check_ledger(sync_view, outcomes)


@pytest.mark.parametrize(("database_url", "driver"), ASYNC_DRIVERS, indirect=["database_url"])
async def test_async_same_key_charges_once(database_url: str, driver: str | None) -> None:
    async with make_async_ledger(database_url, driver) as ledger:
        await ledger.create_schema()
        await ledger.assign_plan(SUBJECT, "hot")
        assert (await ledger.consume(SUBJECT, PRIOR_SPEND, feature=FEATURE)).ok
        results = await asyncio.gather(
            *(ledger.consume(SUBJECT, BIG, feature=FEATURE, key="async-once") for _ in range(32))
        )
        originals = [r for r in results if not r.replayed]
        assert len(originals) == 1, [(r.ok, r.reason, r.replayed) for r in results]
        for r in results:
            assert (r.ok, r.consumed, r.entry_id) == (True, BIG, originals[0].entry_id), r

        async def reserve_once() -> str:
            try:
                r = await ledger.reserve(
                    SUBJECT, 30, feature=FEATURE, key="async-hold", ttl=HOLD_TTL
                )
            except OperationInProgress:
                return "in_progress"
            return "held" if r.ok and not r.replayed else f"unexpected {r!r}"

        # 40 units left: room for one hold of 30, so a loser can only be told "in flight".
        kinds = await asyncio.gather(*(reserve_once() for _ in range(32)))
        assert sorted(kinds) == ["held"] + ["in_progress"] * 31
        balance = await ledger.balance(SUBJECT, FEATURE)
        assert (balance.used, balance.held) == (PRIOR_SPEND + BIG, 30)
