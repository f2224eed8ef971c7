"""Starlette over real HTTP: a bare route, slowapi, and ``@consumes`` on SQLite and PostgreSQL.

Every variant is the same tiny JSON endpoint served by uvicorn with the same settings (one
worker by default, no access log), loaded by ``wrk`` on loopback:

* ``bare``: the route alone (the ceiling);
* ``slowapi``: ``@limiter.limit("1000000/minute")`` with in-memory storage, keyed by the API key
  header (the rate limiter people already put on Starlette/FastAPI routes; never refuses here);
* ``consumes-sqlite`` / ``consumes-postgres``: ``@consumes(1, feature="api_calls")`` with
  ``Metered(app, ...)`` on an :class:`~metered.AsyncLedger`, i.e. a durable reservation before
  the endpoint, its commit after the last body chunk, and the balance header, on the embedded
  SQLite file or PostgreSQL.

Requests rotate over ``--subjects`` API keys (one subject each), as a real API's traffic does.
The variants run in rounds (``--rounds``, rotating the order each round); each run gets a fresh
server and a warm-up before it is measured. The table shows the best run of each variant
(requests/s, and its p50/p99 latency) and its throughput relative to slowapi's. The issue's
target: ``consumes-sqlite`` >= 0.85x slowapi.

Usage::

    apt-get install -y wrk        # the load generator; without it a Python one is used
    .venv/bin/python benchmarks/bench_http_starlette.py
    .venv/bin/python benchmarks/bench_http_starlette.py --duration 5 --rounds 1
    .venv/bin/python benchmarks/bench_http_starlette.py --variants bare,slowapi,consumes-sqlite
    .venv/bin/python benchmarks/bench_http_starlette.py --variants slowapi,consumes-null
    .venv/bin/python benchmarks/bench_http_starlette.py --variants slowapi,consumes-handoff
    .venv/bin/python benchmarks/bench_http_starlette.py --variants slowapi,consumes-inline

PostgreSQL: ``--pg-url``, else ``$METERED_TEST_POSTGRES_URL``, else
``postgresql://postgres@127.0.0.1/test`` (a throwaway schema, dropped at the end; the variant
is skipped with a note when the server is unreachable).

This file is also the app uvicorn serves: ``bench_http_starlette:app_from_env`` (factory), with
the variant in ``$BENCH_VARIANT`` and the ledger URL in ``$BENCH_DB_URL``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from metered._core import Op

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the shared helpers, whatever the working directory
    sys.path.insert(0, str(HERE))

from _http_common import (  # noqa: E402
    ALLOWANCE,
    add_common_arguments,
    add_run_arguments,
    free_port,
    pick_load,
    plans,
    print_table,
    run_rounds,
    run_server,
    wanted_variants,
)

VARIANTS = ("bare", "slowapi", "consumes-sqlite", "consumes-postgres")
EXTRA_VARIANTS = ("consumes-null", "consumes-handoff", "consumes-inline")
"""Not run by default. ``consumes-null``: the adapter on a ledger that answers from memory (no
database): what the adapter itself costs, as opposed to the ledger's transactions.
``consumes-handoff``: the same answers, each sent through the SQLite executor's worker thread
and back (batches that run no SQL): the ceiling of any ledger kept off the event loop.
``consumes-inline``: the blocking SQLite ledger called on the event loop, which metered must
not do: what the two durable writes cost without a thread."""
BASELINE = "slowapi"
_T = TypeVar("_T")


# --------------------------------------------------------------------------- the app


def create_app(variant: str, db_url: str | None = None) -> Starlette:
    """The benchmarked app."""

    async def work(request: Request) -> Response:
        return JSONResponse({"ok": True, "key": request.headers.get("x-api-key")})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    endpoint: Any = work
    setup: Any = None
    if variant == "bare":
        pass
    elif variant == "slowapi":
        from slowapi import Limiter, _rate_limit_exceeded_handler
        from slowapi.errors import RateLimitExceeded

        limiter = Limiter(
            key_func=lambda request: request.headers.get("x-api-key", ""),
            storage_uri="memory://",
        )
        endpoint = limiter.limit("1000000/minute")(work)

        def setup(app: Starlette) -> None:
            app.state.limiter = limiter
            app.add_exception_handler(
                RateLimitExceeded,
                _rate_limit_exceeded_handler,  # type: ignore[arg-type]
            )

    elif variant.startswith("consumes-"):
        from metered import AsyncLedger
        from metered.integrations.starlette import Metered, consumes

        if variant == "consumes-null":
            ledger: AsyncLedger = _null_ledger()
        elif variant == "consumes-handoff":
            ledger = _null_ledger(handoff_url=db_url)
        elif variant == "consumes-inline":
            ledger = _inline_ledger(db_url)
        else:
            ledger = AsyncLedger(db_url, plans=plans(), default_plan="bench")
        endpoint = consumes(1, feature="api_calls")(work)

        def setup(app: Starlette) -> None:
            Metered(app, ledger=ledger, subject=lambda request: request.headers.get("x-api-key"))

    else:
        raise ValueError(f"unknown variant {variant!r}")
    app = Starlette(routes=[Route("/work", endpoint), Route("/health", health)])
    if setup is not None:
        setup(app)
    return app


def _null_ledger(handoff_url: str | None = None) -> Any:
    """An AsyncLedger whose reserve/commit/release answer from memory (consumes-null).

    With ``handoff_url`` (a SQLite file with the ledger's tables), each answer still travels
    through the SQLite executor's worker thread and back, in batches that run no SQL: what
    the thread handoff costs."""
    from metered import AsyncLedger, ConsumeResult, Reservation

    async def answer(ledger: AsyncLedger, value: _T) -> _T:
        if handoff_url is None:
            return value
        result: _T = await ledger._run(_immediately(value))
        return result

    class NullLedger(AsyncLedger):
        async def reserve(self, subject: str, units: int, **kw: Any) -> Reservation:
            return await answer(self, self._reservation(subject, units, kw.get("key")))

        async def commit(self, reservation: Reservation, units: int | None = None) -> Any:
            return await answer(self, self._committed(reservation))

        async def release(self, reservation: Reservation) -> bool:
            return await answer(self, True)

        @staticmethod
        def _reservation(subject: str, units: int, key: str | None) -> Reservation:
            return Reservation.model_construct(
                ok=True, id=1, subject=subject, feature="api_calls", units=units,
                key=key, expires_at=None, usage_remaining=ALLOWANCE, reason=None,
                replayed=False, consumed=0,
            )  # fmt: skip

        @staticmethod
        def _committed(reservation: Reservation) -> ConsumeResult:
            return ConsumeResult.model_construct(
                ok=True, consumed=reservation.units, usage_remaining=ALLOWANCE, replayed=False,
                reason=None, subject=reservation.subject, feature="api_calls", key=None,
                entry_id=1, overage=0,
            )  # fmt: skip

    url = handoff_url or "sqlite:///:memory:"
    return NullLedger(url, plans=plans(), default_plan="bench")


def _inline_ledger(url: str | None) -> Any:
    """An AsyncLedger that runs the blocking SQLite ledger on the event loop (consumes-inline).

    What metered must not do (the loop would wait on the file and its locks): it measures
    what the two durable writes cost the loop without any thread in between."""
    from metered import AsyncLedger, Ledger, Reservation

    blocking = Ledger(url, plans=plans(), default_plan="bench")

    class InlineLedger(AsyncLedger):
        async def reserve(self, subject: str, units: int, **kw: Any) -> Reservation:
            return blocking.reserve(subject, units, **kw)

        async def commit(self, reservation: Reservation, units: int | None = None) -> Any:
            return blocking.commit(reservation, units)

        async def release(self, reservation: Reservation) -> bool:
            return blocking.release(reservation)

    return InlineLedger(url, plans=plans(), default_plan="bench")


def _immediately(value: Any) -> Op:
    """A core operation that runs no statement and returns ``value``."""
    return value
    yield


def app_from_env() -> Starlette:
    """uvicorn factory: ``$BENCH_VARIANT`` on ``$BENCH_DB_URL``."""
    return create_app(os.environ["BENCH_VARIANT"], os.environ.get("BENCH_DB_URL") or None)


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def serve(variant: str, db_url: str | None, args: argparse.Namespace) -> Iterator[int]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench_http_starlette:app_from_env",
        "--factory",
        f"--app-dir={HERE}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--workers={args.workers}",
        "--no-access-log",
        "--log-level=warning",
    ]
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_DB_URL": db_url or ""}
    with run_server(cmd, env, port, f"uvicorn for {variant}") as ready_port:
        yield ready_port


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_run_arguments(parser, VARIANTS)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads-client", type=int, default=1, help="wrk threads")
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    wanted = wanted_variants(parser, args, VARIANTS + EXTRA_VARIANTS)
    load, generator = pick_load(args)
    print(
        f"# uvicorn {args.workers} worker(s); load: {generator}, {args.connections} connections,"
        f" {args.duration:g}s x {args.rounds} rounds; {os.cpu_count()} CPUs;"
        f" Python {sys.version.split()[0]}",
        flush=True,
    )

    results = run_rounds(args, wanted, serve, load, "bench-http-starlette-")
    print_table(results, BASELINE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
