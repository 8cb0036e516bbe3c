"""SQL plumbing shared by the storage modules: the dialect's INSERT (for ``ON CONFLICT``),
id lists for ``IN`` clauses cut under SQLite's host-parameter limit, and raw DBAPI fetches
for the bulk readers (numpy converts plain tuples in C; SQLAlchemy ``Row`` objects cost it a
failed attribute lookup each, seconds for 100k rows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

# SQLite's default limit on host parameters is 32766; stay well below it per statement.
IN_CHUNK = 900


def dialect_insert(session: Session) -> Any:
    """``insert`` of the session's dialect (both have ``on_conflict_do_nothing``)."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def chunks(items: Sequence[Any], size: int = IN_CHUNK) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def id_list(ids: Sequence[int]) -> str:
    """Integer ids as the text of an ``IN (...)`` list: ints only, nothing to inject."""
    return ",".join(str(int(i)) for i in ids)


def fetch_tuples(conn: Connection, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` as plain DBAPI tuples."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()
