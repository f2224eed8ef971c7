"""Helpers for the Starlette/FastAPI tests: plans, databases, clients, a uvicorn subprocess.

Databases are shared per test module (one migrated SQLite file or PostgreSQL schema) and each
test uses fresh subject names, so tests stay isolated without migrating a database each time.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from metered import AsyncLedger, Ledger, Plan
from metered.plans import Feature

PLANS = [
    Plan("free", features={"api_calls": 10}),
    Plan(
        "pro",
        features={"api_calls": 1000, "reports": True, "tokens": Feature(units=500)},
    ),
]
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="pg", marks=pytest.mark.postgres),
]
TIMEOUT = 20.0
INTEGRATIONS_DIR = Path(__file__).resolve().parent.parent


@contextmanager
def database(backend: str, directory: Path) -> Iterator[str]:
    """A migrated database for a module: a SQLite file or a throwaway PostgreSQL schema."""
    if backend == "sqlite":
        url = f"sqlite:///{directory / 'ledger.db'}"
        with Ledger(url, plans=PLANS) as ledger:
            ledger.create_schema()
        yield url
        return
    from support import PostgresSchema, require_postgres

    schema = PostgresSchema(require_postgres())
    try:
        with Ledger(schema.url, plans=PLANS) as ledger:
            ledger.create_schema()
        yield schema.url
    finally:
        schema.drop()


def async_ledger(url: str, **options: Any) -> AsyncLedger:
    options.setdefault("plans", PLANS)
    options.setdefault("default_plan", "free")
    return AsyncLedger(url, **options)


def new_subject(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def client(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """An httpx client calling the ASGI app in-process."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def spent(ledger: AsyncLedger, subject: str, feature: str = "api_calls") -> tuple[int, int]:
    """(used, held) for the subject's current period."""
    balance = await ledger.balance(subject, feature)
    return balance.used, balance.held


def H(subject: str | None, **extra: str) -> dict[str, str]:
    """Request headers: ``x-subject`` (unless None) and ``extra`` (``_`` in names becomes ``-``)."""
    sent = {"x-subject": subject} if subject is not None else {}
    return {**sent, **{k.replace("_", "-"): v for k, v in extra.items()}}


def module_fixtures(name: str) -> tuple[Any, Any, Any]:
    """A test module's ``db_url``, ``ledger`` and ``subject`` fixtures, to be bound by name:
    ``db_url, ledger, subject = module_fixtures("fastapi")``.

    ``db_url``: one migrated database per module and backend (in a temp dir named ``name``);
    ``ledger``: a fresh :class:`AsyncLedger` on it per test; ``subject``: a fresh subject name.
    """

    @pytest.fixture(scope="module", params=BACKENDS)
    def db_url(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[str]:
        with database(request.param, tmp_path_factory.mktemp(name)) as url:
            yield url

    @pytest.fixture
    async def ledger(db_url: str) -> AsyncIterator[AsyncLedger]:
        made = async_ledger(db_url)
        yield made
        await made.close()

    @pytest.fixture
    def subject() -> str:
        return new_subject()

    return db_url, ledger, subject


# --------------------------------------------------------------------------- real servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(0.02)


@contextmanager
def uvicorn(factory: str, *, db_url: str, workers: int = 1) -> Iterator[str]:
    """Serve ``apps.asgi_server:<factory>`` with uvicorn in a subprocess; yields the base URL."""

    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            f"apps.asgi_server:{factory}",
            "--factory",
            "--app-dir",
            str(INTEGRATIONS_DIR),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
            "--log-level",
            "warning",
            "--timeout-graceful-shutdown",
            "2",
        ]

    env = {**os.environ, "METERED_TEST_APP_DB": db_url}
    with _serve(command, env=env, workers=workers) as base:
        yield base


@contextmanager
def _serve(
    command: Callable[[int], list[str]],
    *,
    env: dict[str, str],
    cwd: Path | None = None,
    workers: int = 1,
    ready_path: str = "/health",
) -> Iterator[str]:
    """Run ``command(port)`` until ``ready_path`` answers 200; yields the base URL.

    Retries on another port if the chosen one was taken in between (parallel test runs), and
    always stops the process.
    """
    with tempfile.TemporaryFile() as log:
        for _ in range(3):
            port = free_port()
            proc = subprocess.Popen(command(port), cwd=cwd, env=env, stdout=log, stderr=log)
            base = f"http://127.0.0.1:{port}"
            try:
                if _started(proc, base, workers, ready_path):
                    yield base
                    return
            finally:
                _stop(proc)
        log.seek(0)
        raise RuntimeError(f"server did not start:\n{log.read()[-4000:].decode()}")


def _started(proc: subprocess.Popen[bytes], base: str, workers: int, path: str) -> bool:
    deadline = time.monotonic() + TIMEOUT
    ready = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(base + path, timeout=1.0).status_code == 200:
                ready += 1
                if ready >= workers:  # give every worker a moment to come up
                    return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def raw_get(base: str, path: str, headers: dict[str, str]) -> socket.socket:
    """Send a GET on a raw socket (so the test can hang up whenever it likes)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- examples

EXAMPLES_DIR = INTEGRATIONS_DIR.parent.parent / "examples"


def load_example(name: str) -> Any:
    """Import ``examples/<name>.py`` as a module (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def run_example(name: str, directory: Path) -> Iterator[str]:
    """``python examples/<name>.py`` as a user runs it (in ``directory``); yields the base URL.

    No database URL is given: the example uses its embedded SQLite default in ``directory``.
    """
    env = {k: v for k, v in os.environ.items() if k != "METERED_DATABASE_URL"}

    def command(port: int) -> list[str]:
        env["PORT"] = str(port)
        return [sys.executable, str(EXAMPLES_DIR / f"{name}.py")]

    ready = "/openapi.json" if "fastapi" in name else "/health"
    with _serve(command, env=env, cwd=directory, ready_path=ready) as base:
        yield base


async def eventually_held(ledger: AsyncLedger, subject: str, feature: str = "api_calls") -> None:
    """Wait until the subject has units on hold (a request is in flight)."""
    for _ in range(int(TIMEOUT / 0.01)):
        if (await ledger.balance(subject, feature)).held:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nothing was ever held")


def is_empty(directory: Path) -> bool:
    return not any(directory.iterdir())
