"""Database URLs as users write them (no database needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from metered import AsyncLedger, ConfigurationError, Ledger, Plan
from metered._drivers import DEFAULT_URL, resolve_url

PLANS = [Plan("free", features={"api_calls": 10})]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_sqlite_file(asynchronous: bool) -> None:
    target = resolve_url("sqlite:///x.db", asynchronous=asynchronous)
    assert target.driver == "sqlite"
    assert target.dialect == "sqlite"
    assert target.path == "x.db"
    assert target.sqlalchemy_url == "sqlite:///x.db"
    assert target.paramstyle == "named"


def test_sqlite_absolute_path() -> None:
    target = resolve_url("sqlite:////var/lib/app/ledger.db", asynchronous=False)
    assert target.path == "/var/lib/app/ledger.db"
    assert target.sqlalchemy_url == "sqlite:////var/lib/app/ledger.db"


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://"])
def test_sqlite_memory(url: str) -> None:
    target = resolve_url(url, asynchronous=False)
    assert target.driver == "sqlite"
    assert target.path == ":memory:"


@pytest.mark.parametrize("url", ["sqlite+pysqlite:///x.db", "sqlite+aiosqlite:///x.db"])
def test_sqlite_explicit_drivers(url: str) -> None:
    assert resolve_url(url, asynchronous=True).path == "x.db"


@pytest.mark.parametrize(
    "url",
    [
        "postgres://app:secret@db.example.com:5433/prod",
        "postgresql://app:secret@db.example.com:5433/prod",
        "postgresql+psycopg://app:secret@db.example.com:5433/prod",
    ],
)
@pytest.mark.parametrize("asynchronous", [False, True])
def test_postgres_spellings_run_on_psycopg(url: str, asynchronous: bool) -> None:
    target = resolve_url(url, asynchronous=asynchronous)
    assert target.driver == "psycopg"
    assert target.dialect == "postgresql"
    assert target.paramstyle == "pyformat"
    assert target.sqlalchemy_url == "postgresql+psycopg://app:secret@db.example.com:5433/prod"
    assert target.conninfo == "postgresql://app:secret@db.example.com:5433/prod"


def test_postgres_query_options_are_kept() -> None:
    url = "postgres://u@h/db?sslmode=require&options=-csearch_path%3Dx"
    target = resolve_url(url, asynchronous=False)
    assert target.conninfo is not None
    assert "sslmode=require" in target.conninfo
    assert "search_path" in target.conninfo
    assert "sslmode=require" in target.sqlalchemy_url


def test_password_with_special_characters_survives() -> None:
    target = resolve_url("postgresql://u:p%40ss%2Fw@h/db", asynchronous=False)
    assert target.conninfo == "postgresql://u:p%40ss%2Fw@h/db"


def test_asyncpg_is_honoured_for_async() -> None:
    target = resolve_url("postgresql+asyncpg://u@h/db", asynchronous=True)
    assert target.driver == "asyncpg"
    assert target.paramstyle == "dollar"
    assert target.conninfo == "postgresql://u@h/db"
    # schema work (Alembic) runs on a synchronous driver
    assert target.sqlalchemy_url == "postgresql+psycopg://u@h/db"


def test_asyncpg_with_sync_ledger_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="AsyncLedger"):
        resolve_url("postgresql+asyncpg://u@h/db", asynchronous=False)
    with pytest.raises(ConfigurationError):
        Ledger("postgresql+asyncpg://u@h/db", plans=PLANS)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://u@h/db",
        "postgresql+pg8000://u@h/db",
        "mysql://u@h/db",
        "sqlite+pysqlcipher:///x.db",
        "not a url",
    ],
)
@pytest.mark.parametrize("asynchronous", [False, True])
def test_unsupported_urls(url: str, asynchronous: bool) -> None:
    with pytest.raises(ConfigurationError):
        resolve_url(url, asynchronous=asynchronous)


def test_unsupported_url_in_ledgers() -> None:
    with pytest.raises(ConfigurationError):
        Ledger("postgresql+psycopg2://u@h/db", plans=PLANS)
    with pytest.raises(ConfigurationError):
        AsyncLedger("postgresql+psycopg2://u@h/db", plans=PLANS)


def test_environment_variable_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERED_DATABASE_URL", "postgres://env@h/envdb")
    target = resolve_url(None, asynchronous=False)
    assert target.driver == "psycopg"
    assert target.conninfo == "postgresql://env@h/envdb"
    # an explicit URL wins over the environment
    assert resolve_url("sqlite:///x.db", asynchronous=False).driver == "sqlite"


def test_default_is_sqlite_in_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERED_DATABASE_URL", raising=False)
    assert DEFAULT_URL == "sqlite:///metered.db"
    for url in (None, ""):
        target = resolve_url(url, asynchronous=False)
        assert target.driver == "sqlite"
        assert target.path == "metered.db"
        assert target.sqlalchemy_url == "sqlite:///metered.db"


def test_ledgers_pick_up_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("METERED_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    ledger = Ledger(plans=PLANS, default_plan="free")
    try:
        assert ledger.url == "sqlite:///metered.db"
        ledger.create_schema()
        assert ledger.consume("u", 1, feature="api_calls").ok
        assert (tmp_path / "metered.db").exists()
    finally:
        ledger.close()
    monkeypatch.setenv("METERED_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    with Ledger(plans=PLANS) as sync_ledger:
        assert sync_ledger.url == f"sqlite:///{tmp_path / 'env.db'}"
    assert AsyncLedger(plans=PLANS).url == f"sqlite:///{tmp_path / 'env.db'}"
