"""Helpers for the server tests: an authenticated client wrapper, a project with one token
per scope, and a columnar batch builder."""

from __future__ import annotations

import uuid
import warnings
from typing import Any

# starlette.testclient warns at import that it prefers httpx2 (warnings are errors here);
# import it once, quietly, and let every test module take it from here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient

from rankguard.server.config import Settings

ADMIN_TOKEN = "rg_test-admin-token-0123456789abcdef"
# A fixed Fernet key: test servers never write a key file into the working directory.
SECRET_KEY = "cmFua2d1YXJkLXRlc3Qta2V5LTAxMjM0NTY3ODlhYmM="

__all__ = [
    "ADMIN_TOKEN",
    "SECRET_KEY",
    "Api",
    "Project",
    "TestClient",
    "bearer",
    "make_settings",
    "points_body",
]


def make_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings for an in-process app: the test client's Host ("testserver") is trusted and
    webhooks may go to local receivers (127.0.0.1), as the tests' receivers are."""
    values: dict[str, Any] = {
        "admin_token": ADMIN_TOKEN,
        "pool_timeout_s": 5,
        "allowed_hosts": ["testserver"],
        "webhook_allow": ["127.0.0.1/32"],
        "secret_key": SECRET_KEY,
        **overrides,
    }
    return Settings(database_url=database_url, **values)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Api:
    """A thin authenticated wrapper over the test client for the test bodies."""

    def __init__(self, client: TestClient, token: str) -> None:
        self.client = client
        self.headers = bearer(token)

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(f"/api/v1{path}", headers=self.headers, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        headers = {**self.headers, **kw.pop("headers", {})}
        return self.client.post(f"/api/v1{path}", headers=headers, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.client.delete(f"/api/v1{path}", headers=self.headers, **kw)


class Project:
    """A fresh project with one token per scope."""

    def __init__(self, admin: Api) -> None:
        self.name = f"p{uuid.uuid4().hex[:10]}"
        assert admin.post("/projects", json={"name": self.name}).status_code == 201
        self.tokens: dict[str, str] = {}
        for scope in ("ingest", "read", "operate", "admin"):
            r = admin.post("/tokens", json={"name": scope, "project": self.name, "scopes": [scope]})
            assert r.status_code == 201, r.text
            self.tokens[scope] = r.json()["token"]
        self.api = {scope: Api(admin.client, tok) for scope, tok in self.tokens.items()}

    def new_run(self, **body: Any) -> str:
        r = self.api["ingest"].post("/runs", json={"name": "run", **body})
        assert r.status_code in (200, 201), r.text
        return str(r.json()["id"])


def points_body(
    steps: list[int], values: list[Any], quantity: str = "loss", target: str = "global"
) -> dict[str, Any]:
    n = len(steps)
    return {
        "quantity": [quantity] * n,
        "target": [target] * n,
        "rank": [0] * n,
        "step": steps,
        "wall_time": [1000.0 + s for s in steps],
        "value": values,
    }
