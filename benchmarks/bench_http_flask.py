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
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import Flask, request

HERE = Path(__file__).resolve().parent
VARIANTS = ("bare", "flask-limiter", "consumes-sqlite", "consumes-postgres")
BASELINE = "flask-limiter"
ALLOWANCE = 10**12


def plans() -> list[Any]:
    from metered import Plan

    return [Plan("bench", features={"api_calls": ALLOWANCE})]


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


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
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn for {variant} did not start")
            time.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------- load generators

WRK_SCRIPT = """
local n = math.random(0, {subjects})
request = function()
  n = (n + 1) % {subjects}
  return wrk.format("GET", "/work", {{["X-API-Key"] = "k" .. n}})
end
done = function(summary, latency, requests)
  io.write(string.format("non2xx %d\\n", summary.errors.status))
end
"""


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_wrk(port: int, seconds: float, args: argparse.Namespace) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(subjects=args.subjects))
    try:
        out = subprocess.run(
            [
                "wrk",
                f"-t{args.threads_client}",
                f"-c{args.connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}/work",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
        p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
        errors = int(re.search(r"non2xx (\d+)", out).group(1))  # type: ignore[union-attr]
    except (AttributeError, ValueError) as exc:
        raise RuntimeError(f"cannot read wrk's output:\n{out}") from exc
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return Result(rps, p50, p99, errors)


def run_python(port: int, seconds: float, args: argparse.Namespace) -> Result:
    """Keep-alive clients on threads: weaker than wrk (the GIL), but the same for every variant."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        n = index
        while time.monotonic() < stop:
            n = (n + 1) % args.subjects
            start = time.perf_counter()
            try:
                conn.request("GET", "/work", headers={"X-API-Key": f"k{n}"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors[0] += 1
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                errors[0] += 1
                conn.close()
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    return Result(len(latencies) / elapsed, p50, p99, errors[0])


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def databases(args: argparse.Namespace, wanted: list[str]) -> Iterator[dict[str, str | None]]:
    """A ledger URL per variant: a fresh SQLite file, a throwaway PostgreSQL schema."""
    from metered import Ledger

    urls: dict[str, str | None] = {v: None for v in wanted}
    tmp = tempfile.mkdtemp(prefix="bench-http-flask-")
    schema = None
    pg_url = args.pg_url
    try:
        if "consumes-sqlite" in wanted:
            urls["consumes-sqlite"] = f"sqlite:///{tmp}/ledger.db"
        if "consumes-postgres" in wanted:
            try:
                import psycopg

                schema = "bench_" + uuid.uuid4().hex[:12]
                with psycopg.connect(pg_url, autocommit=True, connect_timeout=3) as conn:
                    conn.execute(f"CREATE SCHEMA {schema}")
                sep = "&" if "?" in pg_url else "?"
                urls["consumes-postgres"] = (
                    f"{pg_url}{sep}options={quote('-csearch_path=' + schema)}"
                )
            except Exception as exc:  # an unreachable server skips the variant
                print(f"# consumes-postgres skipped: {exc}", file=sys.stderr)
                urls.pop("consumes-postgres")
                schema = None
        for url in urls.values():
            if url is not None:
                with Ledger(url, plans=plans(), default_plan="bench") as ledger:
                    ledger.create_schema()
        yield urls
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if schema is not None:
            import psycopg

            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-class", default="sync")
    parser.add_argument("--threads", type=int, default=1, help="gunicorn threads per worker")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads-client", type=int, default=2, help="wrk threads")
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("METERED_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1/test"),
    )
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")
    args = parser.parse_args(argv)

    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in wanted:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    use_wrk = not args.python_client and shutil.which("wrk") is not None
    load = run_wrk if use_wrk else run_python
    generator = "wrk" if use_wrk else "python threads (wrk not found)"
    print(
        f"# gunicorn {args.workers} x {args.worker_class} workers (threads={args.threads}); "
        f"load: {generator}, {args.connections} connections, {args.duration:g}s x "
        f"{args.rounds} rounds; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}",
        flush=True,
    )

    results: dict[str, list[Result]] = {}
    with databases(args, wanted) as urls:
        order = [v for v in wanted if v in urls]
        for round_no in range(args.rounds):
            rotated = order[round_no % len(order) :] + order[: round_no % len(order)]
            for variant in rotated:
                with serve(variant, urls[variant], args) as port:
                    load(port, args.warmup, args)
                    result = load(port, args.duration, args)
                results.setdefault(variant, []).append(result)
                print(
                    f"#   round {round_no + 1} {variant:<18} {result.rps:>9.0f} req/s  "
                    f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                    f"errors {result.errors}",
                    flush=True,
                )

    best = {v: max(rs, key=lambda r: r.rps) for v, rs in results.items()}
    base = best.get(BASELINE)
    print()
    print(f"| variant | req/s | p50 ms | p99 ms | vs {BASELINE} | runs (req/s) |")
    print("|---|---:|---:|---:|---:|---|")
    for variant, result in best.items():
        ratio = f"{result.rps / base.rps:.2f}x" if base else "-"
        runs = ", ".join(f"{r.rps:.0f}" for r in results[variant])
        print(
            f"| {variant} | {result.rps:.0f} | {result.p50_ms:.2f} | {result.p99_ms:.2f} | "
            f"{ratio} | {runs} |"
        )
    if base and "consumes-sqlite" in best:
        target = best["consumes-sqlite"].rps / base.rps
        verdict = "meets" if target >= 0.85 else "misses"
        print(f"\nconsumes-sqlite / {BASELINE} = {target:.2f}x ({verdict} the 0.85x target)")
    median = {v: statistics.median(r.rps for r in rs) for v, rs in results.items()}
    print("# medians (req/s): " + ", ".join(f"{v} {m:.0f}" for v, m in median.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
