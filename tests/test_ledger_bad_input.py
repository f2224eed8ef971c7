"""Bad input raises a precise MeteredError and leaves the ledger exactly as it was."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

import metered
from ledger_support import snapshot, state
from metered import (
    InvalidFeature,
    InvalidInput,
    InvalidSubject,
    InvalidUnits,
    ManualClock,
    MeteredError,
    NotMeteredFeature,
    UnknownFeature,
)
from metered.validation import MAX_UNITS

SUBJECT = "user_1"

BAD_UNITS: list[Any] = [
    True,
    False,
    1.0,
    2.5,
    float("nan"),
    "10",
    b"10",
    None,
    Decimal(10),
    Fraction(10),
    [10],
    0,
    -1,
    -(2**63),
    2**53,
    2**63,
    10**30,
]
BAD_SUBJECTS: list[Any] = ["", "s" * 256, None, 42, b"user_1", ["user_1"], "user\x00_1"]
BAD_FEATURES: list[Any] = ["", "f" * 101, 7, b"api_calls", "api\x00calls"]


@pytest.fixture
def warm(ledger: Any, clock: ManualClock) -> Any:
    """A ledger with some of everything for SUBJECT, so there is state to disturb."""
    ledger.assign_plan(SUBJECT, "pro")
    ledger.consume(SUBJECT, 10, feature="api_calls", key="c")
    ledger.consume(SUBJECT, 1_100, feature="tokens", key="t")
    ledger.grant(SUBJECT, 20, feature="api_calls", key="g")
    ledger.reserve(SUBJECT, 5, feature="api_calls", key="r")
    return ledger


@contextmanager
def unchanged(ledger: Any, url: str) -> Iterator[None]:
    """The block may raise whatever it asserts, but must leave every table as it was."""
    tables = snapshot(url)
    seen = [state(ledger, SUBJECT, feature) for feature in ("api_calls", "tokens")]
    yield
    assert [state(ledger, SUBJECT, feature) for feature in ("api_calls", "tokens")] == seen
    assert snapshot(url) == tables


def _raises(error: type[Exception], method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with pytest.raises(error) as raised:
        method(*args, **kwargs)
    assert isinstance(raised.value, MeteredError), (method, args, kwargs, raised.value)


def test_every_public_error_derives_from_metered_error() -> None:
    errors = [
        obj
        for name in metered.__all__
        if inspect.isclass(obj := getattr(metered, name)) and issubclass(obj, BaseException)
    ]
    assert len(errors) >= 15
    assert all(issubclass(error, MeteredError) for error in errors)
    assert issubclass(InvalidUnits, InvalidInput) and issubclass(InvalidSubject, InvalidInput)


def test_bad_units(warm: Any, ledger_factory: Callable[..., Any]) -> None:
    reservation = warm.reserve(SUBJECT, 3, feature="api_calls")
    with unchanged(warm, ledger_factory.url):
        for units in BAD_UNITS:
            _raises(InvalidUnits, warm.consume, SUBJECT, units, feature="api_calls", key="new")
            _raises(InvalidUnits, warm.consume, SUBJECT, units, feature="tokens")
            _raises(InvalidUnits, warm.reserve, SUBJECT, units, feature="api_calls", key="new")
            _raises(InvalidUnits, warm.grant, SUBJECT, units, feature="api_calls", key="new")
            # committing zero units is allowed, and None means "the units reserved"
            if units is not None and units is not False and units != 0:
                _raises(InvalidUnits, warm.commit, reservation, units=units)


def test_largest_units_are_accepted(ledger: Any) -> None:
    ledger.assign_plan(SUBJECT, "pro")
    refused = ledger.consume(SUBJECT, MAX_UNITS, feature="api_calls")
    assert (refused.ok, refused.reason) == (False, "insufficient_units")
    assert not ledger.reserve(SUBJECT, MAX_UNITS, feature="api_calls").ok
    big = ledger.consume(SUBJECT, MAX_UNITS, feature="tokens")  # overage takes anything
    assert big.ok and big.overage == MAX_UNITS - 1_000
    ledger.grant(SUBJECT, MAX_UNITS, feature="api_calls", key="huge")
    assert ledger.balance(SUBJECT, "api_calls").usage_remaining == MAX_UNITS + 10_000
    assert ledger.consume(SUBJECT, MAX_UNITS, feature="api_calls").ok
    assert ledger.balance(SUBJECT, "api_calls").usage_remaining == 10_000


def test_bad_subjects(warm: Any, ledger_factory: Callable[..., Any]) -> None:
    with unchanged(warm, ledger_factory.url):
        for subject in BAD_SUBJECTS:
            _raises(InvalidSubject, warm.consume, subject, 1, feature="api_calls")
            _raises(InvalidSubject, warm.reserve, subject, 1, feature="api_calls")
            _raises(InvalidSubject, warm.grant, subject, 1, feature="api_calls")
            _raises(InvalidSubject, warm.check, subject, "api_calls")
            _raises(InvalidSubject, warm.balance, subject, "api_calls")
            _raises(InvalidSubject, warm.history, subject)
            _raises(InvalidSubject, warm.assign_plan, subject, "pro")


def test_longest_subject_is_accepted(ledger: Any) -> None:
    subject = "s" * 255
    assert ledger.consume(subject, 1, feature="api_calls").ok
    assert ledger.assign_plan(subject, "pro").subject == subject
    assert ledger.history(subject)[0].subject == subject
    unicode_subject = "org_Zürich_東京"
    assert ledger.consume(unicode_subject, 2, feature="api_calls").ok
    assert ledger.balance(unicode_subject, "api_calls").used == 2


def test_unknown_feature(warm: Any, ledger_factory: Callable[..., Any]) -> None:
    with unchanged(warm, ledger_factory.url):
        _raises(UnknownFeature, warm.consume, SUBJECT, 1, feature="storage")
        _raises(UnknownFeature, warm.consume, SUBJECT, 1, feature="storage", key="c")
        _raises(UnknownFeature, warm.reserve, SUBJECT, 1, feature="storage")
        _raises(UnknownFeature, warm.grant, SUBJECT, 1, feature="storage")
        _raises(UnknownFeature, warm.check, SUBJECT, "storage")
        _raises(UnknownFeature, warm.balance, SUBJECT, "storage")
        _raises(UnknownFeature, warm.consume, SUBJECT, 1, feature="API_CALLS")


def test_malformed_feature_names(warm: Any, ledger_factory: Callable[..., Any]) -> None:
    with unchanged(warm, ledger_factory.url):
        for feature in BAD_FEATURES:
            _raises(InvalidFeature, warm.consume, SUBJECT, 1, feature=feature)
            _raises(InvalidFeature, warm.reserve, SUBJECT, 1, feature=feature)
            _raises(InvalidFeature, warm.grant, SUBJECT, 1, feature=feature)
            _raises(InvalidFeature, warm.check, SUBJECT, feature)
            _raises(InvalidFeature, warm.balance, SUBJECT, feature)
            _raises(InvalidFeature, warm.history, SUBJECT, feature=feature)
        # no feature, and the plans meter more than one: the caller must say which
        _raises(InvalidInput, warm.consume, SUBJECT, 1)


def test_boolean_feature_has_no_units(warm: Any, ledger_factory: Callable[..., Any]) -> None:
    with unchanged(warm, ledger_factory.url):
        _raises(NotMeteredFeature, warm.consume, SUBJECT, 1, feature="reports")
        _raises(NotMeteredFeature, warm.consume, SUBJECT, 1, feature="reports", key="rep")
        _raises(NotMeteredFeature, warm.reserve, SUBJECT, 1, feature="reports")
        _raises(NotMeteredFeature, warm.grant, SUBJECT, 1, feature="reports")
        _raises(NotMeteredFeature, warm.balance, SUBJECT, "reports")
    assert warm.check(SUBJECT, "reports").allowed


def test_bad_ttl(warm: Any, ledger_factory: Callable[..., Any]) -> None:
    with unchanged(warm, ledger_factory.url):
        for ttl in (0, -1, timedelta(0), timedelta(days=8), "60", True, [60]):
            _raises(InvalidInput, warm.reserve, SUBJECT, 1, feature="api_calls", ttl=ttl)
    assert warm.reserve(SUBJECT, 1, feature="api_calls", ttl=timedelta(days=7)).ok
    assert warm.reserve(SUBJECT, 1, feature="api_calls", ttl=0.5).ok


def test_bad_history_arguments(warm: Any) -> None:
    for limit in (0, -5, True, "10", 1.5, None):
        _raises(InvalidInput, warm.history, SUBJECT, limit=limit)
    # ``before`` is a history entry id: anything else is refused the same way on every backend
    for before in ("x", 1.5, True, 0, -1, 2**63, 2**70):
        _raises(InvalidInput, warm.history, SUBJECT, before=before)
    newest = warm.history(SUBJECT, limit=1)
    assert len(newest) == 1
    assert warm.history(SUBJECT, before=2**63 - 1) == warm.history(SUBJECT)
    assert newest[0] not in warm.history(SUBJECT, before=newest[0].id)


def test_bad_options_are_configuration_errors(ledger_factory: Callable[..., Any]) -> None:
    for options in ({"reservation_ttl": 0}, {"reservation_ttl": "5m"}, {"default_plan": "gold"}):
        with pytest.raises(MeteredError):
            ledger_factory(**options)
