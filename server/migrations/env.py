"""Alembic environment: runs on the connection that ``db.upgrade_schema`` (or a test) passes
in ``config.attributes["connection"]``; offline mode is not used."""

from __future__ import annotations

from alembic import context

from rankguard.server import models  # noqa: F401  (registers the tables on Base.metadata)
from rankguard.server.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "rankguard migrations run through rankguard.server.db.upgrade_schema(engine), which "
        "passes a connection; `rankguard serve` applies them on start"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTERs need batch mode
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
