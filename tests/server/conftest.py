"""Server fixtures: the app on each backend (SQLite always; PostgreSQL when
RANKGUARD_TEST_POSTGRES_URL is set), an admin client and per-test projects with tokens.

PostgreSQL: one fresh database per test session (``rankguard_test_<random>``), created and
dropped here, so parallel sessions never collide. If the variable is set and the server is
unreachable the tests fail: a configured backend that silently skips proves nothing."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# starlette.testclient warns that it prefers httpx2 at import; import it once, quietly.
from server_helpers import ADMIN_TOKEN, Api, Project, TestClient, make_settings
from sqlalchemy.engine import make_url

from rankguard.server.config import Settings
from rankguard.server.main import create_app

PG_ENV = "RANKGUARD_TEST_POSTGRES_URL"


def _psycopg_url(url: str) -> str:
    """SQLAlchemy URL -> libpq conninfo for psycopg."""
    u = make_url(url)
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(
            f"{PG_ENV} is not set (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres)"
        )
    import psycopg

    name = f"rankguard_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(_psycopg_url(url), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"{PG_ENV}={url!r} is set but PostgreSQL is unreachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_psycopg_url(url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'rankguard.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, max_body_bytes=64 * 1024)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """An unauthenticated client on a started app (lifespan run: schema, bootstrap)."""
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def admin(client: TestClient) -> Api:
    return Api(client, ADMIN_TOKEN)


@pytest.fixture
def project(admin: Api) -> Project:
    return Project(admin)


@pytest.fixture
def other_project(admin: Api) -> Project:
    return Project(admin)


@pytest.fixture
def tmp_sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fresh.db'}"
