"""Route rules for the middlewares: meter an app by method and path, without touching handlers."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from metered.validation import units as check_units


@dataclass(frozen=True)
class Rule:
    """Meter requests whose method and path match.

    ``path`` is a glob (``"/v1/*"``, ``"/reports/*/pdf"``) or a compiled regex; ``methods``
    None means any. ``units`` and ``key`` may be callables of the framework's request object
    (a Starlette ``Request`` or a WSGI ``environ``). ``units=0`` with ``requires`` set makes
    an entitlement-only rule. The first matching rule wins.
    """

    path: str | re.Pattern[str]
    units: int | Callable[[Any], int] = 1
    feature: str | None = None
    methods: Sequence[str] | None = None
    key: Callable[[Any], str | None] | None = None
    requires: str | None = None
    commit_on: Callable[[int], bool] | None = None

    def __post_init__(self) -> None:
        if not callable(self.units):
            check_units(self.units, allow_zero=self.requires is not None)
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(m.upper() for m in self.methods))

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method.upper() not in self.methods:
            return False
        if isinstance(self.path, re.Pattern):
            return self.path.fullmatch(path) is not None
        return fnmatchcase(path, self.path)

    def units_for(self, request: Any) -> int:
        """The units this request costs (validated when computed from the request)."""
        if callable(self.units):
            return check_units(self.units(request), allow_zero=self.requires is not None)
        return self.units


def first_match(rules: Iterable[Rule], method: str, path: str) -> Rule | None:
    for rule in rules:
        if rule.matches(method, path):
            return rule
    return None


_EXEMPT_PATHS: set[str] = set()


def exempt_path(path: str) -> None:
    """Never meter ``path`` in any middleware (the Stripe webhook endpoints register here)."""
    _EXEMPT_PATHS.add(path.rstrip("/") or "/")


def is_exempt(path: str) -> bool:
    return (path.rstrip("/") or "/") in _EXEMPT_PATHS


def annotate(wrapper: Any, wrapped: Any, **info: Any) -> None:
    """Record what a metered decorator does on the function it returns.

    ``metered routes APP`` reads ``__metered__`` to list every metered route. A new tuple
    each time, so stacked decorators never share (and mutate) their wrapped function's.
    """
    wrapper.__metered__ = (*getattr(wrapped, "__metered__", ()), info)


def describe_units(units: Any) -> str:
    return str(units) if isinstance(units, int) else f"{getattr(units, '__name__', 'callable')}()"


def describe_key(key: Any, header: str = "Idempotency-Key") -> str:
    return f"{getattr(key, '__name__', 'callable')}()" if key is not None else f"{header} header"
