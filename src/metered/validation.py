"""Input validation for every entry point. It runs before any I/O: bad input writes nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from metered.errors import InvalidFeature, InvalidInput, InvalidKey, InvalidSubject, InvalidUnits

MAX_UNITS = 2**53 - 1
"""Largest amount one operation may carry: exact in a JSON number and far from int64 overflow."""
MAX_TOTAL = 2**62
"""Ceiling for accumulated balances (int64 columns)."""
MAX_SUBJECT = 255
MAX_KEY = 255
MAX_FEATURE = 100
MAX_TTL_SECONDS = 7 * 24 * 3600
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def units(value: Any, *, allow_zero: bool = False, name: str = "units") -> int:
    """Validate an amount of units: an ``int`` (not ``bool``), positive (or zero when allowed)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidUnits(f"{name} must be an int, got {type(value).__name__}")
    amount = int(value)  # also normalises int subclasses such as IntEnum
    low = 0 if allow_zero else 1
    if amount < low:
        raise InvalidUnits(f"{name} must be >= {low}, got {amount}")
    if amount > MAX_UNITS:
        raise InvalidUnits(f"{name} must be <= {MAX_UNITS}, got {amount}")
    return amount


def _text(value: Any, *, what: str, limit: int, error: type[InvalidInput]) -> str:
    if not isinstance(value, str):
        raise error(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise error(f"{what} must not be empty")
    if len(value) > limit:
        raise error(f"{what} must be at most {limit} characters, got {len(value)}")
    if "\x00" in value:
        raise error(f"{what} must not contain NUL characters")
    return value


# Each checks the common, valid case inline; _text finds and words what is wrong.


def subject(value: Any) -> str:
    if type(value) is str and 0 < len(value) <= MAX_SUBJECT and "\x00" not in value:
        return value
    return _text(value, what="subject", limit=MAX_SUBJECT, error=InvalidSubject)


def key(value: Any) -> str | None:
    if value is None or (type(value) is str and 0 < len(value) <= MAX_KEY and "\x00" not in value):
        return value
    return _text(value, what="idempotency key", limit=MAX_KEY, error=InvalidKey)


def feature(value: Any) -> str:
    if type(value) is str and 0 < len(value) <= MAX_FEATURE and "\x00" not in value:
        return value
    return _text(value, what="feature", limit=MAX_FEATURE, error=InvalidFeature)


def ttl_us(value: timedelta | float | int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise InvalidInput(f"ttl must be seconds or a timedelta, got {_describe(value)}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not 0 < seconds <= MAX_TTL_SECONDS:
        raise InvalidInput(f"ttl must be within (0, {MAX_TTL_SECONDS}] seconds, got {seconds}")
    return int(seconds * 1_000_000)
