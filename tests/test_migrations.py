"""Schema creation and migrations: idempotent, identical to ``metered.schema``, reversible."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from metered import Ledger, ManualClock, Plan, migrate
from metered._drivers import resolve_url
from metered.schema import metadata

BACKENDS = pytest.mark.parametrize(
    "database_url",
    ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
    indirect=True,
)
PLANS = [Plan("free", features={"api_calls": 10})]
TABLES = {"metered_subjects", "metered_accounts", "metered_operations", "metered_credits"}


def _sa_url(url: str) -> str:
    return resolve_url(url, asynchronous=False).sqlalchemy_url


def _inspect(url: str, what: Callable[[Any], Any]) -> Any:
    engine = create_engine(_sa_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return what(conn)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    return set(_inspect(url, lambda conn: inspect(conn).get_table_names()))


def _diff(url: str) -> list[Any]:
    def compare(conn: Any) -> list[Any]:
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": migrate.VERSION_TABLE,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(context, metadata))

    return _inspect(url, compare)  # type: ignore[no-any-return]


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", "metered:migrations")
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


@BACKENDS
def test_fresh_database_has_no_revision(database_url: str) -> None:
    assert migrate.current(_sa_url(database_url)) is None
    assert not TABLES & _tables(database_url)


@BACKENDS
def test_create_schema_is_idempotent(database_url: str, clock: ManualClock) -> None:
    with Ledger(database_url, plans=PLANS, default_plan="free", clock=clock) as ledger:
        ledger.create_schema()
        assert migrate.current(ledger.url) == _head()
        assert ledger.consume("u", 3, feature="api_calls").ok
        ledger.create_schema()  # again: no error, no data lost
        ledger.create_schema()
        assert migrate.current(ledger.url) == _head()
        assert ledger.balance("u", "api_calls").used == 3
    assert _tables(database_url) >= TABLES
    assert migrate.VERSION_TABLE in _tables(database_url)
    # metered keeps its own version table, out of the way of the application's Alembic
    assert "alembic_version" not in _tables(database_url)


@BACKENDS
def test_migrations_match_schema_module(database_url: str) -> None:
    migrate.upgrade(_sa_url(database_url))
    assert _diff(database_url) == []


@BACKENDS
def test_comparison_would_see_a_difference(database_url: str) -> None:
    """The comparison is not vacuous: a database one revision short differs from schema.py."""
    assert _diff(database_url) != []  # nothing created yet: every table is missing


@BACKENDS
def test_downgrade_to_base_and_upgrade_again(database_url: str, clock: ManualClock) -> None:
    url = _sa_url(database_url)
    migrate.upgrade(url)
    with Ledger(database_url, plans=PLANS, default_plan="free", clock=clock) as ledger:
        assert ledger.consume("u", 4, feature="api_calls").ok
    migrate.downgrade(url, "base")
    assert migrate.current(url) is None
    assert not TABLES & _tables(database_url)
    migrate.upgrade(url)
    assert migrate.current(url) == _head()
    assert _diff(database_url) == []
    with Ledger(database_url, plans=PLANS, default_plan="free", clock=clock) as ledger:
        ledger.create_schema()
        balance = ledger.balance("u", "api_calls")
        assert balance.used == 0, "downgrade to base dropped the old rows"
        result = ledger.consume("u", 10, feature="api_calls")
        assert result.ok and result.usage_remaining == 0
        assert ledger.history("u")[0].kind == "consume"


def test_sqlite_idempotency_keys_work_before_and_after_the_key_index_turns_partial(
    tmp_path: Any, clock: ManualClock
) -> None:
    """0004 leaves unkeyed operations out of SQLite's key index; the upserts must work on both
    sides of the migration, and keys must keep deduplicating."""
    url = f"sqlite:///{tmp_path}/keys.db"
    migrate.upgrade(_sa_url(url), "0003_api_keys")

    def spend() -> list[tuple[bool, bool]]:
        with Ledger(url, plans=PLANS, default_plan="free", clock=clock) as ledger:
            results = [
                ledger.consume("u", 1, feature="api_calls", key="same"),
                ledger.consume("u", 1, feature="api_calls", key="same"),
                ledger.consume("u", 1, feature="api_calls"),
                ledger.consume("u", 1, feature="api_calls"),
            ]
        return [(result.ok, result.replayed) for result in results]

    assert spend() == [(True, False), (True, True), (True, False), (True, False)]
    migrate.upgrade(_sa_url(url))
    index = _inspect(url, lambda conn: conn.exec_driver_sql(_KEY_INDEX_SQL).scalar())
    assert index.endswith('WHERE "key" IS NOT NULL')
    assert spend() == [(True, True), (True, True), (True, False), (True, False)]
    with Ledger(url, plans=PLANS, default_plan="free", clock=clock) as ledger:
        assert ledger.balance("u", "api_calls").used == 1 + 2 + 2


_KEY_INDEX_SQL = "SELECT sql FROM sqlite_master WHERE name = 'uq_metered_operations_key'"
