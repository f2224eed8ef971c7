"""Helpers for the Flask/WSGI server tests: free ports, a gunicorn subprocess, a werkzeug
server thread, raw HTTP over sockets, and polling the ledger until it settles."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from metered import Ledger, Plan

HERE = Path(__file__).resolve().parent
INTEGRATIONS = HERE.parent
TIMEOUT = 30.0
"""Generous wall-clock limit for servers to start and ledgers to settle (CI is slow)."""
PLANS = [
    Plan("free", features={"api_calls": 10}),
    Plan("pro", features={"api_calls": 1000, "reports": True, "tokens": 500}),
]
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="pg", marks=pytest.mark.postgres),
]


def ledger_fixtures() -> tuple[Any, Any]:
    """A test module's ``database_url`` and ``ledger`` fixtures, to be bound by name:
    ``database_url, ledger = ledger_fixtures()``.

    ``database_url``: a fresh database per test and backend (a temp SQLite file or a throwaway
    PostgreSQL schema); ``ledger``: a migrated :class:`Ledger` on :data:`PLANS` over it.
    """

    @pytest.fixture(params=BACKENDS)
    def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
        if request.param == "sqlite":
            yield f"sqlite:///{tmp_path / 'ledger.db'}"
            return
        from support import PostgresSchema, require_postgres

        schema = PostgresSchema(require_postgres())
        try:
            yield schema.url
        finally:
            schema.drop()

    @pytest.fixture
    def ledger(database_url: str) -> Iterator[Ledger]:
        with Ledger(database_url, plans=PLANS, default_plan="free") as made:
            made.create_schema()
            yield made

    return database_url, ledger


def spent(ledger: Ledger, subject: str = "u1", feature: str = "api_calls") -> tuple[int, int]:
    """(used, held) for the subject's current period."""
    balance = ledger.balance(subject, feature)
    return balance.used, balance.held


def free_port() -> int:
    """A port nobody listens on right now (gunicorn cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")
        time.sleep(interval)


def http_get_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()
    except OSError:
        return None


@contextmanager
def gunicorn(
    app: str,
    *,
    env: dict[str, str],
    workers: int = 2,
    worker_class: str = "sync",
    threads: int = 1,
    health: str = "/health",
) -> Iterator[int]:
    """Serve ``app`` (``module:attr`` under tests/integrations) with gunicorn; yields the port.

    The server runs in its own process group and is always stopped (TERM, then KILL).
    """
    for attempt in range(3):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--worker-class",
            worker_class,
            "--threads",
            str(threads),
            "--timeout",
            "60",
            "--graceful-timeout",
            "5",
            "--log-level",
            "warning",
            "--pythonpath",
            str(INTEGRATIONS),
            app,
        ]
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            start_new_session=True,
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while http_get_status(port, health) != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                yield port
                return
            if attempt == 2 or proc.poll() is None:
                log.seek(0)
                raise RuntimeError(f"gunicorn did not start:\n{log.read()[-4000:].decode()}")
        finally:
            _stop(proc)
            log.close()
    raise RuntimeError("gunicorn did not start")  # pragma: no cover


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def werkzeug_server(app: Any) -> Iterator[int]:
    """Serve a WSGI app with werkzeug's threaded dev server in a thread; yields the port."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def raw_request(port: int, path: str, headers: dict[str, str] | None = None) -> socket.socket:
    """Send a GET over a plain socket (so the test controls when to hang up)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read until ``marker`` was received."""
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}; got {data!r}")
        data += chunk
    return data


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def hang_up(sock: socket.socket) -> None:
    """Close abruptly (RST), as a client that went away does."""
    import struct

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
