"""A Flask app under gunicorn, over real sockets: streaming, clients that hang up, and many
concurrent clients spending one subject's balance from several worker processes."""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from apps.flask_server import PLANS, STREAM_UNITS
from apps.wsgi_support import gunicorn, hang_up, raw_request, read_all, read_until, wait_until

from metered import Ledger

pytestmark = pytest.mark.slow

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="pg", marks=pytest.mark.postgres),
]


class Server:
    def __init__(self, port: int, ledger: Ledger) -> None:
        self.port, self.ledger = port, ledger

    def spent(self, subject: str) -> tuple[int, int]:
        balance = self.ledger.balance(subject, "api_calls")
        return balance.used, balance.held


@pytest.fixture(scope="module", params=BACKENDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """gunicorn, 4 gthread workers x 4 threads, serving apps/flask_server.py."""
    schema = None
    if request.param == "sqlite":
        url = f"sqlite:///{Path(tmp_path_factory.mktemp('gunicorn')) / 'ledger.db'}"
    else:
        from support import PostgresSchema, require_postgres

        schema = PostgresSchema(require_postgres())
        url = schema.url
    try:
        with Ledger(url, plans=PLANS, default_plan="free") as ledger:
            ledger.create_schema()
            with gunicorn(
                "apps.flask_server:app",
                env={"METERED_TEST_APP_DB": url},
                workers=4,
                worker_class="gthread",
                threads=4,
            ) as port:
                yield Server(port, ledger)
    finally:
        if schema is not None:
            schema.drop()


def new_subject() -> str:
    return "org_" + uuid.uuid4().hex[:12]


def test_a_fully_read_stream_commits_exactly_once(server: Server) -> None:
    subject = new_subject()
    sock = raw_request(server.port, "/stream?chunks=50", {"X-Subject": subject})
    data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200")
    assert b"Metered-Remaining: 95" in data
    assert data.count(b"chunk ") == 50
    assert data.endswith(b"0\r\n\r\n")  # the terminating chunk: the stream was complete
    wait_until(lambda: server.spent(subject) == (STREAM_UNITS, 0))
    history = server.ledger.history(subject, feature="api_calls")
    assert [(e.state, e.charged) for e in history if e.kind == "reserve"] == [
        ("committed", STREAM_UNITS)
    ]


def test_a_client_hanging_up_mid_stream_is_not_charged(server: Server) -> None:
    subject = new_subject()
    sock = raw_request(server.port, "/stream?chunks=400&delay=0.01", {"X-Subject": subject})
    read_until(sock, b"chunk 0001")
    assert server.spent(subject) == (0, STREAM_UNITS)  # held while streaming
    hang_up(sock)
    wait_until(lambda: server.spent(subject) == (0, 0))
    history = server.ledger.history(subject, feature="api_calls")
    assert [e.state for e in history if e.kind == "reserve"] == ["released"]


def test_an_exception_mid_stream_is_not_charged(server: Server) -> None:
    subject = new_subject()
    sock = raw_request(server.port, "/stream?chunks=50&fail_at=3", {"X-Subject": subject})
    data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200")  # the status was already sent ...
    assert data.count(b"chunk ") == 3
    assert not data.endswith(b"0\r\n\r\n")  # ... but the body never completed
    wait_until(lambda: server.spent(subject) == (0, 0))


def test_concurrent_clients_spend_exactly_the_balance(server: Server) -> None:
    subject = new_subject()
    requests, threads = 300, 16
    todo = iter(range(requests))
    lock = threading.Lock()
    statuses: Counter[int] = Counter()
    bodies: list[dict[str, object]] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            while True:
                with lock:
                    if next(todo, None) is None:
                        break
                conn.request("POST", "/charge", headers={"X-Subject": subject})
                response = conn.getresponse()
                body = response.read()
                with lock:
                    statuses[response.status] += 1
                    if response.status == 402:
                        bodies.append(json.loads(body))
            conn.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not errors, errors
    assert statuses == {200: 100, 402: 200}
    assert {b["type"] for b in bodies} == {"urn:metered:problem:quota-exhausted"}
    assert {b["usage_remaining"] for b in bodies} == {0}
    balance = server.ledger.balance(subject, "api_calls")
    assert (balance.used, balance.held, balance.usage_remaining) == (100, 0, 0)
