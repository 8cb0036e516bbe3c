"""Property-based fuzz of the whole API from its own OpenAPI schema (schemathesis): no
input makes the server answer 5xx, and every documented response matches its schema."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from server_helpers import ADMIN_TOKEN, TestClient, bearer, make_settings, points_body

from rankguard.server.main import create_app

# The schema is read at import (schemathesis' pytest integration needs it to generate the
# test items); the app's database lives in a temporary directory removed at module teardown.
_DB_DIR = tempfile.TemporaryDirectory(prefix="rankguard-fuzz-")
APP = create_app(
    make_settings(f"sqlite:///{Path(_DB_DIR.name) / 'fuzz.db'}", max_body_bytes=256 * 1024)
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def started_app() -> Iterator[None]:
    with TestClient(APP) as client:  # runs the lifespan: schema, admin token, app.state
        run = client.post("/api/v1/runs", json={"name": "fuzz"}, headers=bearer(ADMIN_TOKEN))
        client.post(
            f"/api/v1/runs/{run.json()['id']}/points",
            json=points_body([1, 2], [1.0, "NaN"]),
            headers=bearer(ADMIN_TOKEN),
        )
        yield
    _DB_DIR.cleanup()


# Revoking tokens would lock the fuzzer out of the rest of the API; tested in test_api_runs.
# A webhook test sends a real request to the webhook's (here: generated) URL; tested in
# test_alerting with a local receiver.
@(
    schema.exclude(method="DELETE", path="/api/v1/tokens/{token_id}")
    .exclude(method="POST", path="/api/v1/webhooks/{webhook_id}/test")
    .parametrize()
)
@settings(
    max_examples=10,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_survives_generated_requests(case: Any) -> None:
    case.call_and_validate(
        headers=bearer(ADMIN_TOKEN), checks=[not_a_server_error, response_schema_conformance]
    )
