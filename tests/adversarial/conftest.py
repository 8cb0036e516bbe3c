"""The adversarial suite: one test per attack or fault found against rankguard (issue 18),
each failing on the code before its fix. Server-side tests reuse the server fixtures of
``tests/server/conftest.py`` (the app on SQLite, and on PostgreSQL when
RANKGUARD_TEST_POSTGRES_URL is set), loaded here under their own names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SERVER_TESTS = Path(__file__).resolve().parents[1] / "server"
if str(_SERVER_TESTS) not in sys.path:
    sys.path.insert(0, str(_SERVER_TESTS))  # server_helpers

_spec = importlib.util.spec_from_file_location("server_fixtures", _SERVER_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_server_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_server_fixtures)

# Re-exported: pytest finds fixtures among a conftest's names.
postgres_url = _server_fixtures.postgres_url
sqlite_url = _server_fixtures.sqlite_url
database_url = _server_fixtures.database_url
settings = _server_fixtures.settings
client = _server_fixtures.client
admin = _server_fixtures.admin
project = _server_fixtures.project
other_project = _server_fixtures.other_project
tmp_sqlite = _server_fixtures.tmp_sqlite
