"""Real uvicorn servers and real HTTP clients: streaming, hang-ups, and concurrency.

* A client that reads part of a stream and hangs up is not charged and its reservation is
  released; a full read commits exactly once; an exception while streaming charges nothing.
  (Starlette decorator and FastAPI dependency apps, SQLite.)
* ``uvicorn --workers 2`` on PostgreSQL: 200 concurrent requests against a balance of 100 end
  exactly at zero, the surplus answered 402.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import httpx
import pytest
from apps.asgi_server import PLANS, STREAM_UNITS
from apps.asgi_support import (
    TIMEOUT,
    database,
    new_subject,
    raw_get,
    read_until,
    uvicorn,
    wait_until,
)

from metered import Ledger

pytestmark = pytest.mark.slow


def settled(ledger: Ledger, subject: str) -> tuple[int, int] | None:
    """(used, reservations ever made) once nothing is held any more, else None."""
    balance = ledger.balance(subject, "api_calls")
    if balance.held:
        return None
    reserves = [
        e for e in ledger.history(subject, feature="api_calls", limit=1000) if e.kind == "reserve"
    ]
    return balance.used, len(reserves)


def full_read_commits_exactly_once(base: str, ledger: Ledger) -> None:
    subject = new_subject()
    r = httpx.get(f"{base}/stream?chunks=20", headers={"x-subject": subject}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.text.count("chunk") == 20
    assert r.headers["metered-remaining"] == str(100 - STREAM_UNITS)
    assert wait_until(lambda: settled(ledger, subject)) == (STREAM_UNITS, 1)
    history = ledger.history(subject, feature="api_calls")
    assert [e.state for e in history if e.kind == "reserve"] == ["committed"]


def hanging_up_mid_stream_charges_nothing(base: str, ledger: Ledger, *, reset: bool) -> None:
    subject = new_subject()
    sock = raw_get(base, "/stream?chunks=400&delay=0.01", {"x-subject": subject})
    head = read_until(sock, b"chunk 0001")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"metered-remaining: {100 - STREAM_UNITS}".encode() in head.lower()
    assert ledger.balance(subject, "api_calls").held == STREAM_UNITS  # reserved while streaming
    if reset:  # RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert wait_until(lambda: settled(ledger, subject)) == (0, 1)
    history = ledger.history(subject, feature="api_calls")
    assert [e.state for e in history if e.kind == "reserve"] == ["released"]


def exception_mid_stream_charges_nothing(base: str, ledger: Ledger) -> None:
    subject = new_subject()
    with pytest.raises(httpx.RemoteProtocolError):  # the server cuts the chunked body short
        httpx.get(f"{base}/stream?fail_at=3", headers={"x-subject": subject}, timeout=TIMEOUT)
    assert wait_until(lambda: settled(ledger, subject)) == (0, 1)


@pytest.mark.parametrize("app", ["starlette_app", "fastapi_app"])
def test_streaming_over_uvicorn(app: str, tmp_path: Path) -> None:
    """One server per framework (the Starlette decorator app, the FastAPI dependency app)."""
    with (
        database("sqlite", tmp_path) as url,
        uvicorn(app, db_url=url) as base,
        Ledger(url, plans=PLANS, default_plan="free") as ledger,
    ):
        full_read_commits_exactly_once(base, ledger)
        hanging_up_mid_stream_charges_nothing(base, ledger, reset=False)
        hanging_up_mid_stream_charges_nothing(base, ledger, reset=True)
        exception_mid_stream_charges_nothing(base, ledger)
        full_read_commits_exactly_once(base, ledger)  # the server is still fine


@pytest.mark.postgres
def test_concurrent_clients_on_two_workers_end_exactly_at_zero(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    requests, balance = 200, 100
    subject = new_subject()
    with (
        database("postgres", tmp_path_factory.mktemp("pg")) as url,
        uvicorn("fastapi_app", db_url=url, workers=2) as base,
        Ledger(url, plans=PLANS, default_plan="free") as ledger,
    ):
        assert ledger.balance(subject, "api_calls").usage_remaining == balance

        async def hammer() -> list[int]:
            limits = httpx.Limits(max_connections=50)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=TIMEOUT) as c:
                responses = await asyncio.gather(
                    *(c.post("/charge", headers={"x-subject": subject}) for _ in range(requests))
                )
            return [r.status_code for r in responses]

        statuses = asyncio.run(hammer())
        assert statuses.count(200) == balance
        assert statuses.count(402) == requests - balance
        assert wait_until(lambda: settled(ledger, subject)) == (balance, balance)
        assert ledger.balance(subject, "api_calls").usage_remaining == 0
