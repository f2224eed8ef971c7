"""The Stripe integration's flows, written once for sync and async code.

A flow is a generator that yields *effects* and receives their results: :class:`Db` (a core
operation for the ledger's executor), :class:`Api` (a ``StripeClient`` call) and
:class:`Sleep`. :func:`run_sync` performs them with blocking calls, :func:`run_async` with
``await`` (``*_async`` client methods, ``asyncio.sleep``). An effect that raises has its
exception thrown back into the flow, which may handle it (the export retries) or not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stripe import StripeClient, StripeObject

from metered import _core

T = TypeVar("T")


@dataclass(frozen=True)
class Db:
    """Run a core operation (one or more transactions) on the ledger."""

    op: _core.Op


@dataclass(frozen=True)
class Api:
    """Call ``client.<path>.<method>(*args, **kwargs)``; results come back as plain dicts.

    ``raw=True`` returns the ``StripeObject`` itself (for values handed to the caller).
    """

    path: tuple[str, ...]
    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    raw: bool = False

    def bound(self, client: StripeClient, suffix: str = "") -> Callable[..., Any]:
        target: Any = client
        for name in self.path:
            target = getattr(target, name)
        return getattr(target, self.method + suffix)  # type: ignore[no-any-return]

    def result(self, value: Any) -> Any:
        if self.raw or not isinstance(value, StripeObject):
            return value
        return value.to_dict()


@dataclass(frozen=True)
class Sleep:
    seconds: float


Effect = Db | Api | Sleep
Flow = Generator[Effect, Any, T]


def _step(flow: Flow[T], value: Any, error: BaseException | None) -> Effect:
    return flow.throw(error) if error is not None else flow.send(value)


def run_sync(
    flow: Flow[T],
    ledger: Any,
    client: StripeClient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Perform a flow's effects with blocking calls."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = _step(flow, value, error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        value, error = None, None
        try:
            if isinstance(effect, Db):
                value = ledger._run(effect.op)
            elif isinstance(effect, Api):
                value = effect.result(effect.bound(client)(*effect.args, **effect.kwargs))
            else:
                sleep(effect.seconds)
        except Exception as exc:
            error = exc


async def run_async(
    flow: Flow[T],
    ledger: Any,
    client: StripeClient,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> T:
    """Perform a flow's effects with ``await``: the async ledger and ``*_async`` client calls."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = _step(flow, value, error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        value, error = None, None
        try:
            if isinstance(effect, Db):
                value = await ledger._run(effect.op)
            elif isinstance(effect, Api):
                call = effect.bound(client, "_async")
                value = effect.result(await call(*effect.args, **effect.kwargs))
            else:
                result = sleep(effect.seconds)
                if asyncio.iscoroutine(result):
                    await result
        except Exception as exc:
            error = exc
