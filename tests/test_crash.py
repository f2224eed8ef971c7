"""Workers die with SIGKILL: a crash never charges a customer and never corrupts the ledger.

Workers are spawned processes with their own ``Ledger`` on the real clock. The parent looks
at the same database through a ledger on a :class:`ManualClock` that starts at the real
time, so it can step past a reservation's TTL without sleeping (one test sleeps through a
real 1 s TTL instead, with both sides on the real clock).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
import traceback
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from metered import (
    Ledger,
    ManualClock,
    OperationInProgress,
    Plan,
    Reservation,
    ReservationExpired,
)
from metered.clock import to_us

FEATURE = "api_calls"
SUBJECT = "org_crash"
ALLOWANCE = 200
BIG_ALLOWANCE = 10_000_000
PLANS = [
    Plan("small", features={FEATURE: ALLOWANCE}),
    Plan("big", features={FEATURE: BIG_ALLOWANCE}),
]
TIMEOUT = 90.0

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)"),
]


def make_ledger(url: str, **options: Any) -> Ledger:
    return Ledger(url, plans=PLANS, default_plan="small", **options)


@pytest.fixture
def clock() -> ManualClock:
    """Starts at the real time, so it agrees with the workers' clocks until moved."""
    return ManualClock()


@pytest.fixture
def parent(database_url: str, clock: ManualClock) -> Iterator[Ledger]:
    ledger = make_ledger(database_url, clock=clock)
    ledger.create_schema()
    try:
        yield ledger
    finally:
        ledger.close()


def all_history(ledger: Ledger) -> list[Any]:
    lines: list[Any] = []
    before = None
    while True:
        page = ledger.history(SUBJECT, limit=1000, before=before)
        if not page:
            return lines
        lines.extend(page)
        before = page[-1].id


def spawn(target: Any, *args: Any) -> Any:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL


# --------------------------------------------------------------------------- reserve, die


def reserve_and_hang(url: str, units: int, key: str, ttl: float, queue: Any) -> None:
    """Reserve, report the reservation, then wait forever to be killed (never settles)."""
    try:
        ledger = make_ledger(url)
        reservation = ledger.reserve(SUBJECT, units, feature=FEATURE, key=key, ttl=ttl)
        queue.put(("ok", reservation))
    except BaseException:
        queue.put(("error", traceback.format_exc()))
        return
    time.sleep(3600)


def reserve_in_killed_worker(url: str, units: int, key: str, ttl: float) -> Reservation:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = spawn(reserve_and_hang, url, units, key, ttl, queue)
    try:
        status, value = queue.get(timeout=TIMEOUT)
        assert status == "ok", value
    finally:
        kill(proc)
    assert isinstance(value, Reservation) and value.ok
    return value


def assert_nothing_charged(ledger: Ledger, reservation: Reservation) -> None:
    balance = ledger.balance(SUBJECT, FEATURE)
    assert (balance.used, balance.held, balance.usage_remaining) == (0, 0, ALLOWANCE)
    check = ledger.check(SUBJECT, FEATURE)
    assert (check.allowed, check.usage_remaining) == (True, ALLOWANCE)
    with pytest.raises(ReservationExpired):
        ledger.commit(reservation)
    assert ledger.release(reservation) is False
    # Reads never write, so until the next write the line may still say "held"; it is
    # past its expiry either way, and nothing was charged.
    (line,) = [line for line in all_history(ledger) if line.kind in ("reserve", "consume")]
    assert (line.id, line.charged) == (reservation.id, None)
    assert line.state in ("held", "expired")
    assert line.expires_at is not None and to_us(line.expires_at) <= ledger.clock.now_us()
    # The dead worker's key is free again: a retry of its request gets a fresh hold.
    retry = ledger.reserve(SUBJECT, reservation.units, feature=FEATURE, key=reservation.key)
    assert retry.ok and not retry.replayed and retry.id != reservation.id
    assert ledger.release(retry) is True
    lines = [line for line in all_history(ledger) if line.kind in ("reserve", "consume")]
    assert {(line.id, line.state, line.charged) for line in lines} == {
        (reservation.id, "expired", None),
        (retry.id, "released", None),
    }
    balance = ledger.balance(SUBJECT, FEATURE)
    assert (balance.used, balance.held, balance.usage_remaining) == (0, 0, ALLOWANCE)


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_killed_reservation_comes_back_after_its_ttl(
    parent: Ledger, clock: ManualClock, database_url: str
) -> None:
    parent.assign_plan(SUBJECT, "small")
    reservation = reserve_in_killed_worker(database_url, 40, "job-1", 30.0)

    # Dead, but within its TTL: the hold stands and its key answers "in flight".
    balance = parent.balance(SUBJECT, FEATURE)
    assert (balance.used, balance.held, balance.usage_remaining) == (0, 40, ALLOWANCE - 40)
    with pytest.raises(OperationInProgress):
        parent.reserve(SUBJECT, 40, feature=FEATURE, key="job-1")
    assert not parent.consume(SUBJECT, ALLOWANCE, feature=FEATURE).ok

    assert reservation.expires_at is not None
    clock.set(reservation.expires_at - timedelta(milliseconds=1))
    assert parent.balance(SUBJECT, FEATURE).held == 40
    clock.set(reservation.expires_at)
    assert_nothing_charged(parent, reservation)


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_killed_reservation_comes_back_on_the_real_clock(database_url: str) -> None:
    with make_ledger(database_url) as ledger:
        ledger.create_schema()
        ledger.assign_plan(SUBJECT, "small")
        reservation = reserve_in_killed_worker(database_url, 25, "job-real", 1.0)
        assert reservation.expires_at is not None
        # Whatever is left of the second once the worker is dead, plus a generous margin.
        wait = to_us(reservation.expires_at) / 1e6 - time.time() + 0.2
        if wait > 0:
            assert ledger.balance(SUBJECT, FEATURE).held == 25
            time.sleep(wait)
        assert_nothing_charged(ledger, reservation)


# --------------------------------------------------------------------------- die mid-burst


def burst(url: str, seed: int, progress: Any) -> None:
    """Spend as fast as possible, forever: consumes, holds committed, released or left over."""
    rng = random.Random(seed)
    ledger = make_ledger(url)
    while True:
        units = rng.randint(1, 7)
        action = rng.random()
        if action < 0.4:
            ledger.consume(SUBJECT, units, feature=FEATURE, key=f"c-{seed}-{rng.random()}")
        else:
            reservation = ledger.reserve(SUBJECT, units, feature=FEATURE, ttl=30)
            if action < 0.7:
                ledger.commit(reservation, units=rng.randint(0, units + 2))
            elif action < 0.9:
                ledger.release(reservation)
            # else: left held, as a worker dying right after reserve would leave it
        with progress.get_lock():
            progress.value += 1


def assert_consistent(ledger: Ledger, *, expect_held: bool | None = None) -> None:
    """The balance is explained, line by line, by the history."""
    lines = [line for line in all_history(ledger) if line.kind in ("consume", "reserve")]
    assert len({line.id for line in lines}) == len(lines)
    committed = [line for line in lines if line.state == "committed"]
    assert all(line.charged is not None for line in committed)
    now = ledger.clock.now_us()
    live_holds = [
        line
        for line in lines
        if line.state == "held" and line.expires_at is not None and to_us(line.expires_at) > now
    ]
    balance = ledger.balance(SUBJECT, FEATURE)
    assert balance.used == sum(line.charged for line in committed)
    assert balance.used == sum(line.from_allowance for line in committed)
    assert balance.held == sum(line.units for line in live_holds)
    assert balance.usage_remaining == BIG_ALLOWANCE - balance.used - balance.held
    assert ledger.check(SUBJECT, FEATURE).usage_remaining == balance.usage_remaining
    if expect_held is not None:
        assert bool(balance.held) == expect_held
    settled = [line for line in lines if line.state in ("released", "expired")]
    assert all(line.charged is None for line in settled)


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_workers_killed_mid_burst_leave_a_consistent_ledger(
    parent: Ledger, clock: ManualClock, database_url: str
) -> None:
    parent.assign_plan(SUBJECT, "big")
    ctx = multiprocessing.get_context("spawn")
    rng = random.Random()
    workers = []
    for seed in range(3):
        progress = ctx.Value("i", 0)
        workers.append((spawn(burst, database_url, seed, progress), progress))
    try:
        deadline = time.monotonic() + TIMEOUT
        for proc, progress in workers:
            # Killed at a random point of a running burst, after it got going.
            target = rng.randint(20, 200)
            while progress.value < target:
                assert proc.is_alive(), "a burst worker died on its own"
                assert time.monotonic() < deadline, "a burst worker made no progress"
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.01))
            kill(proc)
    finally:
        for proc, _ in workers:
            if proc.is_alive():
                proc.kill()
                proc.join()

    assert_consistent(parent)
    # The survivors are not blocked by anything the dead left behind (locks, transactions).
    assert parent.consume(SUBJECT, 3, feature=FEATURE, key="after-the-crash").ok
    assert_consistent(parent)
    # Past the TTL every hold the dead left behind is back; nothing else changed.
    used = parent.balance(SUBJECT, FEATURE).used
    clock.set(datetime.now(timezone.utc) + timedelta(seconds=31))
    assert_consistent(parent, expect_held=False)
    assert parent.balance(SUBJECT, FEATURE).used == used
