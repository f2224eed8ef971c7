"""Alembic environment for metered's own tables (run through :mod:`metered.migrate`)."""

from __future__ import annotations

from alembic import context

from metered.migrate import VERSION_TABLE
from metered.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
