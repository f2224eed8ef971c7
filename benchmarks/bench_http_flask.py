"""Flask over real HTTP: a bare route, flask-limiter, and ``@consumes`` on SQLite and PostgreSQL.

Every variant is the same tiny JSON route served by gunicorn with the same settings (by default
2 sync workers, one per core of the CI machine), loaded by ``wrk`` on loopback:

* ``bare``: the route alone (the ceiling);
* ``flask-limiter``: ``@limiter.limit("1000000 per minute")`` with in-memory storage, keyed by
  the API key header (the rate limiter people already put on routes; never refuses here);
* ``consumes-sqlite`` / ``consumes-postgres``: ``@consumes(1, feature="api_calls")``, i.e. a
  durable reservation before the view and its commit after it, plus the balance header, on
  the embedded SQLite file or PostgreSQL.

Requests rotate over ``--subjects`` API keys (one subject each), so the ledger spreads over
many rows as a real API's traffic does. The variants run in rounds (``--rounds``, rotating the
order each round); each run gets a fresh server and a warm-up before it is measured. The table
shows the best run of each variant (requests/s, and its p50/p99 latency) and the ratio of its
throughput to flask-limiter's. The issue's target: ``consumes-sqlite`` >= 0.85x flask-limiter.

Usage::

    apt-get install -y wrk        # the load generator; without it a Python one is used
    .venv/bin/python benchmarks/bench_http_flask.py
    .venv/bin/python benchmarks/bench_http_flask.py --duration 5 --variants bare,consumes-sqlite
    .venv/bin/python benchmarks/bench_http_flask.py --workers 4 --worker-class gthread --threads 4

PostgreSQL: ``--pg-url``, else ``$METERED_TEST_POSTGRES_URL``, else
``postgresql://postgres@127.0.0.1/test`` (a throwaway schema, dropped at the end; skipped with
a note when unreachable).

This file is also the app gunicorn serves: ``bench_http_flask:create_app('<variant>')``, with
the ledger URL in ``$BENCH_DB_URL``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, request

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the shared helpers, whatever the working directory
    sys.path.insert(0, str(HERE))

from _http_common import (  # noqa: E402
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

VARIANTS = ("bare", "flask-limiter", "consumes-sqlite", "consumes-postgres")
BASELINE = "flask-limiter"


# --------------------------------------------------------------------------- the app


def create_app(variant: str) -> Flask:
    """The benchmarked app; gunicorn builds one per worker."""
    app = Flask(__name__)

    def work() -> dict[str, Any]:
        return {"ok": True, "key": request.headers.get("X-API-Key")}

    if variant == "bare":
        view = work
    elif variant == "flask-limiter":
        from flask_limiter import Limiter

        limiter = Limiter(
            key_func=lambda: request.headers.get("X-API-Key", ""),
            app=app,
            storage_uri="memory://",
        )
        view = limiter.limit("1000000 per minute")(work)
    elif variant.startswith("consumes-"):
        from metered import Ledger
        from metered.integrations.flask import Metered, consumes

        ledger = Ledger(os.environ["BENCH_DB_URL"], plans=plans(), default_plan="bench")
        Metered(app, ledger=ledger, subject=lambda: request.headers.get("X-API-Key"))
        view = consumes(1, feature="api_calls")(work)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    app.add_url_rule("/work", "work", view)
    app.add_url_rule("/health", "health", lambda: "ok")
    return app


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def serve(variant: str, db_url: str | None, args: argparse.Namespace) -> Iterator[int]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        f"--bind=127.0.0.1:{port}",
        f"--workers={args.workers}",
        f"--worker-class={args.worker_class}",
        f"--threads={args.threads}",
        "--log-level=warning",
        f"--pythonpath={HERE}",
        f"bench_http_flask:create_app({variant!r})",
    ]
    env = {**os.environ, "BENCH_DB_URL": db_url or ""}
    with run_server(cmd, env, port, f"gunicorn for {variant}") as ready_port:
        yield ready_port


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, VARIANTS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-class", default="sync")
    parser.add_argument("--threads", type=int, default=1, help="gunicorn threads per worker")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads-client", type=int, default=2, help="wrk threads")
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    wanted = wanted_variants(parser, args, VARIANTS)
    load, generator = pick_load(args)
    print(
        f"# gunicorn {args.workers} x {args.worker_class} workers (threads={args.threads}); "
        f"load: {generator}, {args.connections} connections, {args.duration:g}s x "
        f"{args.rounds} rounds; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}",
        flush=True,
    )

    results = run_rounds(args, wanted, serve, load, "bench-http-flask-")
    print_table(results, BASELINE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
