"""Schema creation and upgrades through the Alembic migrations shipped in the package.

The version is kept in ``metered_alembic_version`` so it never collides with the
application's own Alembic history. On PostgreSQL an advisory lock makes concurrent
``create_schema()`` calls from many workers safe.
"""

from __future__ import annotations

import os
from importlib.resources import files

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from metered import _sqlite_wal

VERSION_TABLE = "metered_alembic_version"
_LOCK_ID = 0x6D657465726564  # "metered"


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("metered") / "migrations"))
    config.attributes["connection"] = connection
    return config


def _with_connection(sqlalchemy_url: str, action: str, revision: str) -> str | None:
    engine = create_engine(sqlalchemy_url, poolclass=NullPool)
    database = engine.url.database
    new_file = database not in (None, "", ":memory:") and not (
        os.path.exists(database) and os.path.getsize(database)
    )
    if engine.dialect.name == "sqlite" and action == "upgrade" and new_file:
        # A new file gets the ledger's page size before its first table (see _sqlite_wal).
        # Existing files are left alone: ``current`` must stay read-only.
        event.listen(engine, "connect", lambda conn, _: _sqlite_wal.configure_new(conn))
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
            config = _config(connection)
            if action == "upgrade":
                command.upgrade(config, revision)
            elif action == "downgrade":
                command.downgrade(config, revision)
            else:
                from alembic.runtime.migration import MigrationContext

                context = MigrationContext.configure(
                    connection, opts={"version_table": VERSION_TABLE}
                )
                return context.get_current_revision()
    finally:
        engine.dispose()
    return None


def upgrade(sqlalchemy_url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent)."""
    _with_connection(sqlalchemy_url, "upgrade", revision)


def downgrade(sqlalchemy_url: str, revision: str) -> None:
    """Revert migrations down to ``revision`` (``base`` drops every metered table)."""
    _with_connection(sqlalchemy_url, "downgrade", revision)


def current(sqlalchemy_url: str) -> str | None:
    """The applied revision, or None on a database without the metered schema."""
    return _with_connection(sqlalchemy_url, "current", "")
