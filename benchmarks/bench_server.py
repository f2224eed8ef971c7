"""Requests/s and latency of ``POST /v1/usage/consume`` under ``metered serve``, next to the
in-process ``consume`` measured in the same run.

For each backend (SQLite file, PostgreSQL) the run

1. times the in-process ledger on the same database: ``Ledger.consume`` one call at a time
   (the floor of one request's work), and ``AsyncLedger.consume`` from ``--connections``
   concurrent tasks (what the server's event loop can get from the ledger);
2. starts ``metered serve --workers N`` (uvicorn, httptools, uvloop when installed) on a free
   loopback port, warms it up, and drives ``POST /v1/usage/consume`` for ``--duration``
   seconds from ``--connections`` keep-alive connections: every request carries a unique
   ``Idempotency-Key`` and spends 1 unit of one of 1,000 subjects per connection.

The load generator is ``wrk`` (``apt-get install -y wrk``) with a Lua script that builds
each request; without it, a small asyncio HTTP/1.1 client (``--client python``; it costs
more CPU per request, so it understates the server). Client and server share the machine:
on a 2-core box they compete for CPU, so the numbers are a floor, not a capacity plan.
Latency is per request as the client saw it (p50/p99, milliseconds). Every response must be
200: a run with any other status is an error. Each row is run ``--repeat`` times (default 3)
and the fastest run is reported, which filters out other load on a shared machine.

Usage::

    .venv/bin/python benchmarks/bench_server.py                       # SQLite and PostgreSQL
    .venv/bin/python benchmarks/bench_server.py --backend sqlite --duration 5 --workers 1,2
    .venv/bin/python benchmarks/bench_server.py --json > server.json

PostgreSQL: ``--pg-url``, else ``$METERED_TEST_POSTGRES_URL``, else
``postgresql://postgres@127.0.0.1/test``; the run uses a throwaway schema and drops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from metered import AsyncLedger, Catalog, Ledger
from metered.server import create_key

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1/test"
PLANS_TOML = 'default_plan = "bench"\n[plans.bench.features]\napi_calls = 1_000_000_000_000\n'
SUBJECTS = 1000
_MAIN = "import sys; from metered.cli import main; sys.exit(main())"

WRK_SCRIPT = r"""
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  counter = 0
  auth = "Bearer " .. os.getenv("METERED_API_KEY")
  prefix = os.getenv("RUN_ID") .. "-" .. tid .. "-"
end
function request()
  counter = counter + 1
  local body = '{"subject_ref":"bench-' .. tid .. '-' .. (counter % 1000) .. '","units":1}'
  return wrk.format("POST", "/v1/usage/consume", {
    ["Authorization"] = auth,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
  }, body)
end
function done(summary, latency, requests)
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d,'
    .. ' "p50_us": %d, "p99_us": %d, "mean_us": %f}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


def row(backend: str, what: str, setup: str, ops: int, seconds: float, lat_ns: list[int]) -> dict:
    lat = sorted(lat_ns)
    return {
        "backend": backend,
        "what": what,
        "setup": setup,
        "requests": ops,
        "per_second": ops / seconds,
        "p50_ms": percentile(lat, 50) / 1e6,
        "p99_ms": percentile(lat, 99) / 1e6,
    }


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the most requests per second (the least disturbed by other load)."""
    return max(runs, key=lambda run: float(run["per_second"]))


# --------------------------------------------------------------------------- in-process


def bench_sync(backend: str, url: str, plans: Catalog, ops: int) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    with Ledger(url, plans=plans) as ledger:
        for i in range(200):  # warm-up: connections, account rows of the first subjects
            ledger.consume(f"inproc-{i % SUBJECTS}", 1, key=f"w{run}-{i}")
        lat: list[int] = []
        start = time.perf_counter()
        for i in range(ops):
            t0 = time.perf_counter_ns()
            result = ledger.consume(f"inproc-{i % SUBJECTS}", 1, key=f"{run}-{i}")
            lat.append(time.perf_counter_ns() - t0)
            if not result.ok:
                raise RuntimeError(f"in-process consume refused: {result}")
        seconds = time.perf_counter() - start
    return row(backend, "in-process Ledger.consume", "1 thread, sequential", ops, seconds, lat)


def bench_async(
    backend: str, url: str, plans: Catalog, ops: int, concurrency: int
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]

    async def main() -> tuple[float, list[int]]:
        async with AsyncLedger(url, plans=plans, pool_size=concurrency) as ledger:
            lat: list[int] = []

            async def task(t: int, n: int, record: bool) -> None:
                for i in range(n):
                    t0 = time.perf_counter_ns()
                    subject = f"async-{t}-{i % SUBJECTS}"
                    result = await ledger.consume(subject, 1, key=f"{run}-{record}-{t}-{i}")
                    if record:
                        lat.append(time.perf_counter_ns() - t0)
                    if not result.ok:
                        raise RuntimeError(f"in-process consume refused: {result}")

            await asyncio.gather(*(task(t, 20, False) for t in range(concurrency)))
            start = time.perf_counter()
            per_task = max(ops // concurrency, 1)
            await asyncio.gather(*(task(t, per_task, True) for t in range(concurrency)))
            return time.perf_counter() - start, lat

    seconds, lat = asyncio.run(main())
    setup = f"{concurrency} concurrent tasks, 1 event loop"
    return row(backend, "in-process AsyncLedger.consume", setup, len(lat), seconds, lat)


# --------------------------------------------------------------------------- server


@contextmanager
def serve(url: str, plans: Path, workers: int) -> Iterator[int]:
    """``metered serve`` on a free loopback port; yields the port; always stopped."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("STRIPE_API_KEY", None)
    args = ["--url", url, "--plans", str(plans), "--port", "0", "--workers", str(workers)]
    process = subprocess.Popen(
        [sys.executable, "-c", _MAIN, "serve", *args, "--no-access-log", "--log-level", "info"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    port: list[int] = []
    lines: list[str] = []
    found = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if not port and (m := re.search(r"running on http://[\d.]+:(\d+)", line)):
                port.append(int(m.group(1)))
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        found.wait(60)
        if not port:
            raise RuntimeError("metered serve did not start:\n" + "".join(lines))
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port[0]}/openapi.json", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield port[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def load_wrk(port: int, key: str, connections: int, duration: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    try:
        threads = max(1, min(2, connections))
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s"]
        command += ["-s", script.name, f"http://127.0.0.1:{port}"]
        env = {**os.environ, "METERED_API_KEY": key, "RUN_ID": uuid.uuid4().hex[:8]}
        out = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=duration + 60
        )
    finally:
        os.unlink(script.name)
    match = re.search(r"RESULT (\{.*\})", out.stdout)
    if match is None:
        raise RuntimeError(f"wrk failed:\n{out.stdout}\n{out.stderr}")
    result = json.loads(match.group(1))
    seconds = result["duration_us"] / 1e6
    return {
        "requests": result["requests"],
        "per_second": result["requests"] / seconds,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": result["non2xx"] + result["socket_errors"],
    }


def load_python(port: int, key: str, connections: int, duration: float) -> dict[str, Any]:
    """A minimal keep-alive HTTP/1.1 load generator on asyncio streams."""
    run = uuid.uuid4().hex[:8]

    async def main() -> tuple[int, list[int], int, float]:
        lat: list[int] = []
        errors = 0
        stop = time.perf_counter() + duration

        async def worker(w: int) -> None:
            nonlocal errors
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            n = 0
            while time.perf_counter() < stop:
                n += 1
                body = json.dumps({"subject_ref": f"bench-{w}-{n % SUBJECTS}", "units": 1})
                head = (
                    "POST /v1/usage/consume HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                    f"Idempotency-Key: {run}-{w}-{n}\r\nContent-Length: {len(body)}\r\n\r\n"
                )
                t0 = time.perf_counter_ns()
                writer.write(head.encode() + body.encode())
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                lat.append(time.perf_counter_ns() - t0)
                errors += status != 200
            writer.close()

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(connections)))
        return len(lat), lat, errors, time.perf_counter() - start

    count, lat, errors, seconds = asyncio.run(main())
    lat.sort()
    return {
        "requests": count,
        "per_second": count / seconds,
        "p50_ms": percentile(lat, 50) / 1e6,
        "p99_ms": percentile(lat, 99) / 1e6,
        "errors": errors,
    }


def bench_http(
    backend: str, url: str, plans: Path, key: str, workers: int, args: argparse.Namespace
) -> dict[str, Any]:
    load = load_wrk if args.client == "wrk" else load_python
    with serve(url, plans, workers) as port:
        load(port, key, args.connections, min(2.0, args.duration))  # warm-up
        runs = [load(port, key, args.connections, args.duration) for _ in range(args.repeat)]
    if any(run["errors"] for run in runs):
        raise RuntimeError(f"{backend}: the server answered non-200 responses: {runs}")
    result = best(runs)
    del result["errors"]
    plural = "s" if workers > 1 else ""
    return {
        "backend": backend,
        "what": "HTTP POST /v1/usage/consume",
        "setup": f"{workers} uvicorn worker{plural}, {args.connections} conns ({args.client})",
        **result,
    }


# --------------------------------------------------------------------------- driver


@contextmanager
def database(backend: str, args: argparse.Namespace) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="metered-bench-") as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    import psycopg

    base = args.pg_url
    schema = "bench_" + uuid.uuid4().hex[:12]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}options={quote('-csearch_path=' + schema)}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def bench_backend(backend: str, args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with database(backend, args) as url, tempfile.TemporaryDirectory() as tmp:
        plans_file = Path(tmp) / "plans.toml"
        plans_file.write_text(PLANS_TOML)
        plans = Catalog.load(plans_file)
        with Ledger(url, plans=plans) as ledger:
            ledger.create_schema()
        key = create_key(url, "test", name="bench").secret
        log(f"{backend}: in-process consume")
        rows.append(best([bench_sync(backend, url, plans, args.ops) for _ in range(args.repeat)]))
        rows.append(
            best(
                [
                    bench_async(backend, url, plans, args.ops, args.connections)
                    for _ in range(args.repeat)
                ]
            )
        )
        for workers in args.workers:
            log(f"{backend}: HTTP, {workers} worker(s), {args.duration}s")
            rows.append(bench_http(backend, url, plans_file, key, workers, args))
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    header = ("backend", "what", "setup", "req/s", "p50 ms", "p99 ms")
    cells = [
        (
            r["backend"],
            r["what"],
            r["setup"],
            f"{r['per_second']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda values: " | ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *(line(c) for c in cells)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "all"), default="all")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per HTTP run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", default="1,2", help="uvicorn worker counts, e.g. 1,2")
    parser.add_argument("--ops", type=int, default=5000, help="in-process operations timed")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per row; the fastest is reported"
    )
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--pg-url", default=os.environ.get("METERED_TEST_POSTGRES_URL", DEFAULT_PG_URL)
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    backends = ["sqlite", "postgres"] if args.backend == "all" else [args.backend]
    rows: list[dict[str, Any]] = []
    for backend in backends:
        try:
            rows += bench_backend(backend, args, log)
        except Exception as exc:
            if args.backend == "all" and backend == "postgres" and "connect" in str(exc).lower():
                log(f"postgres: skipped ({str(exc).splitlines()[0]})")
                continue
            raise
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "client": args.client,
        "duration_s": args.duration,
        "repeat": args.repeat,
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps({"environment": meta, "results": rows}, indent=2))
    else:
        print(render(rows))
        print(f"\n{meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
