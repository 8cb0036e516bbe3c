"""Engine, sessions, the declarative base and the two column types every backend needs.

SQLite (WAL) is the default store and PostgreSQL the production one; the differences that
matter are handled here and nowhere else:

- SQLite cannot store NaN: ``sqlite3_bind_double(NaN)`` stores NULL. ``value`` columns are
  ``FloatValue``, which writes NaN as NULL on SQLite and reads NULL back as NaN. Those columns
  never hold NULL for any other reason (the API has no null value), so the mapping is exact.
  PostgreSQL ``double precision`` stores NaN and +-Infinity natively.
- SQLite allows one writer at a time. Writes in this process go through one lock, so
  concurrent ingest requests queue in order instead of spinning on ``database is locked``;
  ``busy_timeout`` covers writers in other processes.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import DateTime, Double, Engine, MetaData, create_engine, event
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from rankguard.server.config import Settings

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite returns naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        stored: dt.datetime = value
        if stored.tzinfo is None:
            return stored.replace(tzinfo=dt.timezone.utc)
        return stored.astimezone(dt.timezone.utc)


class FloatValue(TypeDecorator[float]):
    """A double that keeps NaN and +-Inf on every backend (NaN is NULL on SQLite, see above)."""

    impl = Double()
    cache_ok = True

    def process_bind_param(self, value: float | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name == "sqlite" and math.isnan(value):
            return None
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> float:
        return math.nan if value is None else float(value)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# JSON columns (alert-rule state above all: read and rewritten for every rule on every ingest
# batch) go through orjson: ~6x faster to encode and ~3x to decode than the json module on
# those states. Non-string keys become strings, as json.dumps makes them. Non-finite floats
# never go in (orjson would write null): the engine stores them as the contract's strings, and
# so do the API's free-form objects (schemas.WireObject).
def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def make_engine(settings: Settings) -> Engine:
    """Engine with a bounded pool; SQLite gets WAL and pragmas on every connection."""
    url = settings.database_url
    kwargs: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout_s,
        "pool_pre_ping": not url.startswith("sqlite"),
        "json_serializer": _json_text,
        "json_deserializer": orjson.loads,
    }
    if url.startswith("sqlite"):
        # Connections move between the threadpool's threads; each is used by one at a time.
        kwargs["connect_args"] = {"check_same_thread": False}
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise ValueError(
                f"database_url={url!r}: an in-memory SQLite database is private to one "
                "connection; use a file, e.g. sqlite:///./rankguard.db"
            )
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        busy_ms = settings.sqlite_busy_timeout_ms

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache per connection
            cur.close()

    return engine


class Database:
    """The engine, a session factory and the SQLite write lock, kept on ``app.state.db``."""

    def __init__(self, engine: Engine, *, lock_timeout_s: float) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock = threading.Lock()
        self._lock_timeout_s = lock_timeout_s

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction, committed on success, rolled back on error."""
        locked = False
        if self.is_sqlite:
            locked = self._write_lock.acquire(timeout=self._lock_timeout_s)
            if not locked:
                raise WriteBusyError(
                    f"no database write slot within {self._lock_timeout_s} s (SQLite allows "
                    "one writer at a time)"
                )
        try:
            with self.sessions() as session, session.begin():
                yield session
        finally:
            if locked:
                self._write_lock.release()

    def dispose(self) -> None:
        self.engine.dispose()


class WriteBusyError(RuntimeError):
    """The database could not take a write in time; the client should retry (503)."""


MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def upgrade_schema(engine: Engine) -> None:
    """Alembic ``upgrade head`` on ``engine``. On PostgreSQL an advisory lock makes several
    workers starting at once take turns instead of racing on DDL."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(724113)")  # arbitrary fixed key
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
