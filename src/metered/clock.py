"""Clocks. The ledger reads time only through a clock, so tests can move it without sleeping.

Internally time is an ``int`` of microseconds since the Unix epoch (UTC): it compares and
stores the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol, runtime_checkable

UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@runtime_checkable
class Clock(Protocol):
    """Anything with a ``now_us()`` method returning microseconds since the epoch."""

    def now_us(self) -> int: ...


class SystemClock:
    """Wall-clock time."""

    def now_us(self) -> int:
        return time.time_ns() // 1000


class ManualClock:
    """A clock that only moves when told to. Thread-safe.

    >>> clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    >>> clock.advance(days=31)
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._lock = threading.Lock()
        self._now = to_us(start) if start is not None else SystemClock().now_us()

    def now_us(self) -> int:
        return self._now

    def now(self) -> datetime:
        return from_us(self._now)

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = to_us(when)

    def advance(self, delta: timedelta | float = 0.0, **kwargs: float) -> None:
        """Move forward by a timedelta, a number of seconds, or ``timedelta`` keyword arguments."""
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        step += timedelta(**kwargs)
        with self._lock:
            self._now += step // timedelta(microseconds=1)


def to_us(when: datetime) -> int:
    """A datetime as microseconds since the epoch; naive datetimes are taken as UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=us)


def duration_us(value: timedelta | float) -> int:
    """A duration given as a timedelta or a number of seconds, in microseconds."""
    if isinstance(value, timedelta):
        return value // timedelta(microseconds=1)
    return int(value * 1_000_000)
