"""What the HTTP benchmarks share: load generators, servers, databases and the result table.

Used by ``bench_http_flask.py`` and ``bench_http_starlette.py`` (each puts this directory on
``sys.path`` before importing it, so they run from any working directory).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

ALLOWANCE = 10**12


def plans() -> list[Any]:
    from metered import Plan

    return [Plan("bench", features={"api_calls": ALLOWANCE})]


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
def run_server(cmd: list[str], env: dict[str, str], port: int, what: str) -> Iterator[int]:
    """Start ``cmd`` (a server listening on ``port``), wait for ``/health``, stop it after."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
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


Load = Callable[[int, float, argparse.Namespace], Result]


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(text)
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.M)
    if match is None:
        raise RuntimeError(f"cannot read wrk's output ({pattern}):\n{text}")
    return match.group(1)


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
    errors = int(_find(r"non2xx (\d+)", out))
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return Result(
        float(_find(r"Requests/sec:\s+([\d.]+)", out)),
        _ms(_find(r"^\s*50%\s+(\S+)", out)),
        _ms(_find(r"^\s*99%\s+(\S+)", out)),
        errors,
    )


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


def pick_load(args: argparse.Namespace) -> tuple[Load, str]:
    """wrk when it is installed (and not ``--python-client``), else the Python generator."""
    use_wrk = not args.python_client and shutil.which("wrk") is not None
    load: Load = run_wrk if use_wrk else run_python
    return load, "wrk" if use_wrk else "python threads (wrk not found)"


def add_run_arguments(parser: argparse.ArgumentParser, variants: tuple[str, ...]) -> None:
    """``--variants``, ``--duration``, ``--warmup`` and ``--rounds`` (every script starts so)."""
    parser.add_argument("--variants", default=",".join(variants))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per run")
    parser.add_argument("--rounds", type=int, default=2)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--subjects``, ``--pg-url`` and ``--python-client`` (the options every script ends with)."""
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("METERED_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1/test"),
    )
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")


# --------------------------------------------------------------------------- main


def wanted_variants(
    parser: argparse.ArgumentParser, args: argparse.Namespace, known: tuple[str, ...]
) -> list[str]:
    """The variants ``--variants`` names, in its order; an unknown one is a usage error."""
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in wanted:
        if variant not in known:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(known)}")
    return wanted


@contextlib.contextmanager
def databases(
    args: argparse.Namespace, wanted: list[str], tmp_prefix: str
) -> Iterator[dict[str, str | None]]:
    """A ledger URL per variant: a fresh SQLite file, a throwaway PostgreSQL schema."""
    from metered import Ledger

    urls: dict[str, str | None] = {v: None for v in wanted}
    tmp = tempfile.mkdtemp(prefix=tmp_prefix)
    schema = None
    pg_url = args.pg_url
    try:
        for variant in ("consumes-sqlite", "consumes-handoff", "consumes-inline"):
            if variant in wanted:
                urls[variant] = f"sqlite:///{tmp}/{variant}.db"
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


Serve = Callable[[str, str | None, argparse.Namespace], contextlib.AbstractContextManager[int]]


def run_rounds(
    args: argparse.Namespace, wanted: list[str], serve: Serve, load: Load, tmp_prefix: str
) -> dict[str, list[Result]]:
    """Every wanted variant ``--rounds`` times (rotating the order), each on a fresh server."""
    results: dict[str, list[Result]] = {}
    with databases(args, wanted, tmp_prefix) as urls:
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
    return results


def print_table(results: dict[str, list[Result]], baseline: str) -> None:
    """The best run of each variant, its ratio to ``baseline``, and the 0.85x verdict."""
    best = {v: max(rs, key=lambda r: r.rps) for v, rs in results.items()}
    base = best.get(baseline)
    print()
    print(f"| variant | req/s | p50 ms | p99 ms | vs {baseline} | errors | runs (req/s) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for variant, result in best.items():
        ratio = f"{result.rps / base.rps:.2f}x" if base else "-"
        runs = ", ".join(f"{r.rps:.0f}" for r in results[variant])
        print(
            f"| {variant} | {result.rps:.0f} | {result.p50_ms:.2f} | {result.p99_ms:.2f} | "
            f"{ratio} | {result.errors} | {runs} |"
        )
    if base and "consumes-sqlite" in best:
        target = best["consumes-sqlite"].rps / base.rps
        verdict = "meets" if target >= 0.85 else "misses"
        print(f"\nconsumes-sqlite / {baseline} = {target:.2f}x ({verdict} the 0.85x target)")
    median = {v: statistics.median(r.rps for r in rs) for v, rs in results.items()}
    print("# medians (req/s): " + ", ".join(f"{v} {m:.0f}" for v, m in median.items()))
