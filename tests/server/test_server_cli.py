"""``metered keys create|list|revoke`` and ``metered serve`` argument handling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from server_support import PLANS
from sqlalchemy import create_engine, text

from metered import Ledger
from metered.cli import main
from metered.server.keys import parse_key

pytestmark = pytest.mark.slow


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    with Ledger(url, plans=PLANS) as ledger:
        ledger.create_schema()
    return url


def test_keys_lifecycle(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--mode", "test", "--name", "worker", "--url", url]) == 0
    human = capsys.readouterr().out
    secret = human.split()[0]
    assert parse_key(secret) is not None and secret.startswith("mk_test_")
    assert "only time" in human

    assert main(["keys", "create", "--mode", "live", "--url", url, "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["mode"] == "live" and created["key"].startswith(created["id"])

    assert main(["keys", "list", "--url", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["mode"], k["name"], k["revoked_at"]) for k in listed] == [
        ("live", None, None),
        ("test", "worker", None),
    ]
    assert secret not in json.dumps(listed) and created["key"] not in json.dumps(listed)

    # stored: the id and the SHA-256 of the whole key, never the key itself
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM metered_api_keys")).all()
    engine.dispose()
    assert secret not in repr(rows)
    assert hashlib.sha256(secret.encode()).hexdigest() in {row.secret_hash for row in rows}

    key_id = listed[1]["id"]
    assert main(["keys", "revoke", key_id, "--url", url]) == 0
    assert main(["keys", "revoke", key_id, "--url", url]) == 1
    assert "no active key" in capsys.readouterr().err
    assert main(["keys", "list", "--url", url]) == 0
    assert "worker" in capsys.readouterr().out


def test_keys_need_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["keys", "create", "--mode", "test", "--url", url]) == 3
    assert "metered db upgrade" in capsys.readouterr().err


def test_keys_and_serve_arguments(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["keys", "create", "--mode", "staging", "--url", url])
    assert exited.value.code == 2
    monkeypatch.delenv("METERED_PLANS", raising=False)
    assert main(["serve", "--url", url]) == 2
    assert "--plans" in capsys.readouterr().err
    assert main(["serve", "--url", url, "--plans", str(tmp_path / "missing.toml")]) == 2
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    assert "--workers" in capsys.readouterr().out
