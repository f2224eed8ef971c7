"""``metered serve`` for real: uvicorn in a subprocess on a free port, clients over TCP.

* A JavaScript client (``client.mjs``, nothing but ``fetch``) run by Node against the server.
* 32 concurrent HTTP clients against two uvicorn workers: no overspend, exactly-once keys.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from server_support import PLANS_TOML, LiveServer

from metered import Catalog, Ledger
from metered.server import create_key

pytestmark = pytest.mark.slow
CLIENT = Path(__file__).with_name("client.mjs")


def prepare(database_url: str, tmp_path: Path, units: int) -> tuple[Path, str]:
    """A plans file (``free`` = ``units`` api_calls), the schema, and a test-mode key."""
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS_TOML.format(units=units))
    with Ledger(database_url, plans=Catalog.load(plans)) as ledger:
        ledger.create_schema()
    return plans, create_key(database_url, "test", name="live-test").secret


def used(database_url: str, plans: Path, subject: str) -> tuple[int, int]:
    with Ledger(database_url, plans=Catalog.load(plans)) as ledger:
        balance = ledger.balance(subject, "api_calls")
    return balance.used, balance.held


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_node_fetch_client(database_url: str, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (the fetch client needs node >= 18)")
    plans, key = prepare(database_url, tmp_path, units=3)
    with LiveServer(database_url, plans) as server:
        env = {
            **os.environ,
            "METERED_URL": server.base_url,
            "METERED_API_KEY": key,
            "SUBJECT": "node user/1",
        }
        result = subprocess.run(
            [node, str(CLIENT)], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert re.search(r"node client: \d+ checks passed", result.stdout), result.stdout
    assert used(database_url, plans, "node user/1") == (3, 0)


def _hammer(base_url: str, key: str) -> tuple[Counter[int], int, Counter[bool]]:
    """300 POSTs from 32 client threads, each on its own keep-alive connection.

    (Plain ``http.client`` on threads: httpx's async pool is the bottleneck at this
    concurrency and would turn a sub-second run into several seconds.)
    """
    host, port = base_url.removeprefix("http://").split(":")
    local = threading.local()

    def consume(subject: str, idempotency_key: str) -> tuple[int, dict[str, Any]]:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = json.dumps({"subject_ref": subject, "units": 1})
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key,
        }
        conn.request("POST", "/v1/usage/consume", body, headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    calls = [("crowd", f"c{i}") for i in range(200)] + [("retry", f"r{i % 20}") for i in range(100)]
    random.Random(7).shuffle(calls)  # the two crowds interleave
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda call: (call[0], *consume(*call)), calls))
    crowd = [(status, body) for subject, status, body in results if subject == "crowd"]
    retry = [(status, body) for subject, status, body in results if subject == "retry"]
    assert all(status == 200 for status, _ in retry), retry
    statuses = Counter(status for status, _ in crowd)
    charged = sum(body["consumed"] for status, body in crowd if status == 200)
    return statuses, charged, Counter(body["replayed"] for _, body in retry)


def test_concurrent_clients_never_overspend(database_url: str, tmp_path: Path) -> None:
    """200 requests of 1 unit for 100 units, from 32 clients to 2 workers: exactly 100
    succeed; 100 requests under 20 keys (5 each, concurrently): exactly 20 are charged."""
    plans, key = prepare(database_url, tmp_path, units=100)
    with LiveServer(database_url, plans, workers=2) as server:
        statuses, charged, replayed = _hammer(server.base_url, key)
    assert statuses == {200: 100, 402: 100}
    assert charged == 100
    assert replayed == {False: 20, True: 80}
    assert used(database_url, plans, "crowd") == (100, 0)
    assert used(database_url, plans, "retry") == (20, 0)
