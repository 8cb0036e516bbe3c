"""Alembic migrations on an empty database produce exactly the models' schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from rankguard.server import models  # noqa: F401
from rankguard.server.db import Base, upgrade_schema


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        upgrade_schema(engine)
        upgrade_schema(engine)  # a second upgrade is a no-op
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert set(inspect(conn).get_table_names()) >= set(Base.metadata.tables)
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_migrations_match_models_on_empty_sqlite(tmp_sqlite: str) -> None:
    assert _diff(tmp_sqlite) == []


@pytest.mark.postgres
def test_migrations_match_models_on_empty_postgres(postgres_url: str) -> None:
    # the session database may already be migrated by the API tests: use a schema of our own
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    name = f"mig_{uuid.uuid4().hex[:8]}"
    base = make_url(postgres_url)
    with psycopg.connect(
        base.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True
    ) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        assert _diff(base.set(database=name).render_as_string(hide_password=False)) == []
    finally:
        with psycopg.connect(
            base.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True
        ) as c:
            c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
