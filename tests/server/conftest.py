"""Fixtures of the HTTP API tests: an app over a fresh ledger on SQLite and PostgreSQL.

``client`` talks to the app in-process (httpx's ASGI transport) with a test-mode key, and
checks every response against the app's OpenAPI document (:class:`OpenApiChecker`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from server_support import PLANS, FakeBilling, OpenApiChecker

from metered import AsyncLedger, ManualClock
from metered.server import create_app, create_key

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests that use the database (``database_url`` of tests/conftest.py) run on both."""
    if "database_url" in metafunc.fixturenames and not any(
        "database_url" in marker.args[0]
        for marker in metafunc.definition.iter_markers("parametrize")
    ):
        metafunc.parametrize("database_url", BACKENDS, indirect=True)


@pytest.fixture
def db_url(database_url: str) -> str:
    return database_url


@pytest.fixture
async def ledger(db_url: str, clock: ManualClock) -> AsyncIterator[AsyncLedger]:
    ledger = AsyncLedger(db_url, plans=PLANS, default_plan="free", clock=clock)
    await ledger.create_schema()
    try:
        yield ledger
    finally:
        await ledger.close()


@pytest.fixture
async def keys(ledger: AsyncLedger, db_url: str) -> dict[str, str]:
    """One key per mode (``test``, ``live``), created like ``metered keys create`` does."""
    made = [await asyncio.to_thread(create_key, db_url, mode) for mode in ("test", "live")]
    return {new.key.mode: new.secret for new in made}


@pytest.fixture
def billing() -> FakeBilling:
    return FakeBilling()


@pytest.fixture(scope="session")
def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document (the same for every app; built once, it takes ~0.1 s)."""
    ledger = AsyncLedger("sqlite:///:memory:", plans=PLANS, default_plan="free")
    document: dict[str, Any] = create_app(ledger).openapi()
    return document


@pytest.fixture
def make_client(openapi_document: dict[str, Any]) -> Iterator[Callable[..., httpx.AsyncClient]]:
    """``make_client(app, key=None)``: an httpx client over ASGI that checks the OpenAPI."""

    def make(app: Any, key: str | None = None) -> httpx.AsyncClient:
        checker = OpenApiChecker(openapi_document)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://metered.test",
            headers=headers,
            event_hooks={"response": [checker]},
        )

    yield make


@pytest.fixture
async def client(
    ledger: AsyncLedger,
    keys: dict[str, str],
    billing: FakeBilling,
    make_client: Callable[..., httpx.AsyncClient],
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ledger, billing=billing, key_cache_seconds=0)
    async with make_client(app, keys["test"]) as client:
        yield client
