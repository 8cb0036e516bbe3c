"""``rankguard report``: one self-contained HTML file with every figure and the timeline."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import synthetic

from rankguard.dashboard import page
from rankguard.dashboard.report import RunNotFoundError, build_report
from rankguard.server import cli
from rankguard.server.config import Settings
from rankguard.server.db import Database, make_engine
from rankguard.server.main import create_app

with warnings.catch_warnings():
    # starlette 1.x deprecates its TestClient over httpx (it wants httpx2); the client works.
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    from fastapi.testclient import TestClient

ADMIN = "rg_test-admin-token-for-dashboard-report"


class Refs(HTMLParser):
    """Collects every URL-bearing attribute and the figure JSON blocks of a document."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.json_ids: list[str] = []
        self.scripts_with_src = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name in ("src", "href", "action", "data", "poster"):
            if found.get(name):
                self.urls.append((tag, name, found[name] or ""))
        if tag == "script" and "src" in found:
            self.scripts_with_src += 1
        if tag == "script" and found.get("type") == "application/json":
            self.json_ids.append(found.get("id") or "")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'rg.db'}"


def seed(db_url: str, *, nan_every: int = 0) -> str:
    settings = Settings(database_url=db_url, admin_token=ADMIN, allowed_hosts=["testserver"])
    with TestClient(create_app(settings)) as client:
        run_id = synthetic.seed_via_api(client, ADMIN, blocks=2, steps=50, nan_every=nan_every)
        order = {"kind": "msign", "args": {"targets": "attention", "engine": "svd"}}
        resp = client.post(
            f"/api/v1/runs/{run_id}/commands",
            json=order,
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert resp.status_code == 201, resp.text
    return run_id


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    settings = Settings(database_url=db_url)
    db = Database(make_engine(settings), lock_timeout_s=5)
    yield db
    db.dispose()


def report(database: Database, run_id: str) -> str:
    with database.read() as session:
        return build_report(session, run_id)


def test_report_is_self_contained(db_url: str, database: Database) -> None:
    run_id = seed(db_url)
    html = report(database, run_id)
    refs = Refs()
    refs.feed(html)
    assert refs.scripts_with_src == 0
    assert refs.urls == [], refs.urls  # no script, stylesheet, image or link to fetch
    assert "<link" not in html
    assert "plotly.js v" in html[:2_000_000]  # the library itself is inlined
    # No URL that a browser would fetch; plotly's own code mentions some, but never in a
    # src/href (checked above), and the figures' JSON carries none.
    for block in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', html, re.S):
        assert not re.search(r"https?://", block)


def test_report_has_every_figure_and_the_timeline(db_url: str, database: Database) -> None:
    run_id = seed(db_url)
    html = report(database, run_id)
    refs = Refs()
    refs.feed(html)
    assert refs.json_ids == [f"data-{fid}" for fid in page.FIGURE_IDS]
    for fid in page.FIGURE_IDS:
        assert f'<div id="{fid}"' in html
        block = re.search(
            rf'<script type="application/json" id="data-{fid}">(.*?)</script>', html, re.S
        )
        assert block is not None
        fig = json.loads(block.group(1))
        assert fig["data"], fid
        shapes = {s.get("name") for s in fig["layout"].get("shapes", [])}
        assert {"event-alert", "event-intervention"} <= shapes, fid
    timeline = html[html.index('id="timeline"') :]
    assert "stable-rank-collapse: stable rank fell below 2" in timeline
    assert "intervention" in timeline and "command_queued" in timeline
    assert f"Order MSign on run {run_id}" in html  # the suggested action, run id filled in
    assert "msign" in html[html.index('id="commands"') :]


def test_nan_laden_run_reports(db_url: str, database: Database) -> None:
    run_id = seed(db_url, nan_every=5)
    html = report(database, run_id)
    block = re.search(
        r'<script type="application/json" id="data-fig-loss">(.*?)</script>', html, re.S
    )
    assert block is not None
    fig = json.loads(block.group(1))  # strict JSON: NaN never appears as a literal
    assert "NaN values" in {t.get("name") for t in fig["data"]}


def test_embedded_text_cannot_close_the_script(db_url: str, database: Database) -> None:
    run_id = seed(db_url)
    settings = Settings(database_url=db_url, admin_token=ADMIN, allowed_hosts=["testserver"])
    with TestClient(create_app(settings)) as client:
        evil = {"kind": "alert", "step": 3, "payload": {"message": "</script><script>alert(1)"}}
        resp = client.post(
            f"/api/v1/runs/{run_id}/events", json=evil, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert resp.status_code == 201
    html = report(database, run_id)
    assert "<script>alert(1)" not in html
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in html  # escaped in the tables


def test_unknown_run_is_an_error(db_url: str, database: Database) -> None:
    seed(db_url)
    with pytest.raises(RunNotFoundError, match="run_id='nope'"):
        report(database, "nope")


def test_cli_writes_the_report(db_url: str, tmp_path: Path) -> None:
    run_id = seed(db_url)
    out = tmp_path / "report.html"
    assert cli.main(["report", run_id, "-o", str(out), "--database-url", db_url]) == 0
    text = out.read_text(encoding="utf-8")
    assert all(f'id="{fid}"' in text for fid in page.FIGURE_IDS)
    assert cli.main(["report", "nope", "-o", str(out), "--database-url", db_url]) == 1
