"""``examples/flask_app.py`` imports without side effects and works as documented."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from apps.wsgi_support import free_port, http_get_status, wait_until

from metered import Ledger

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flask_app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flask_app_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    example = load_example()
    assert list(tmp_path.iterdir()) == []  # importing created no database
    with Ledger(
        f"sqlite:///{tmp_path / 'x.db'}", plans=example.PLANS, default_plan="free"
    ) as ledger:
        ledger.create_schema()
        ledger.assign_plan("user_pro", "pro")
        client = example.create_app(ledger).test_client()
        free, pro = {"X-API-Key": "demo-free"}, {"X-API-Key": "demo-pro"}

        assert client.post("/v1/generate").status_code == 401
        response = client.post("/v1/generate", headers={**free, "Idempotency-Key": "job-1"})
        assert (response.json, response.headers["Metered-Remaining"]) == (
            {"result": "generated", "replayed": False},
            "99",
        )
        response = client.post("/v1/generate", headers={**free, "Idempotency-Key": "job-1"})
        assert response.json == {"result": "generated", "replayed": True}

        assert client.get("/v1/reports/usage", headers=free).status_code == 403
        response = client.get("/v1/reports/usage", headers=pro)
        assert response.status_code == 200 and response.json["entries"]

        response = client.post("/v1/chat", headers=pro, buffered=True)
        assert response.text.startswith("metered charges only")
        assert ledger.balance("user_pro", "tokens").used == 9

        assert client.get("/v1/balance", headers=free).json["used"] == 1
        ledger.consume("user_free", 99, feature="api_calls")
        response = client.post("/v1/generate", headers=free)
        assert response.status_code == 402
        assert response.mimetype == "application/json"  # the app's own 402 handler
        assert response.json["upgrade_url"] == "https://example.com/pricing"
        assert response.json["type"] == "urn:metered:problem:quota-exhausted"


@pytest.mark.slow
def test_the_example_runs_as_a_script(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE)],
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if k != "METERED_DATABASE_URL"},
            "PORT": str(port),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: http_get_status(port, "/v1/balance") == 401)
        assert (tmp_path / "metered.db").exists()  # the embedded SQLite default
    finally:
        proc.terminate()
        proc.wait(timeout=10)
