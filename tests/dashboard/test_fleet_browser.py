"""The fleet pages in headless Chromium against a real ``rankguard serve`` whose own rules
judge a small fleet (tests/helpers/fleet.py), every response under the server's CSP: the runs
list (data in the DOM, filters that change the URL and the rows, paging, back button), compare
(the right runs overlaid, picked from the runs list or added by name) and the incident page
(found from Grafana's link, with the commands, the recovery events and the outcome).
Screenshots go to ``test-artifacts/`` (git-ignored)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from helpers import fleet as seed
from helpers.browser import ARTIFACTS, chromium, login, wait_rendered, with_csp
from helpers.live_server import LiveServer, running_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]


class Env:
    def __init__(self, server: LiveServer, tokens: dict[str, str], fleet: seed.Fleet) -> None:
        self.url, self.tokens, self.fleet = server.url, tokens, fleet


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("fleet-browser")
    with running_server(tmp) as server:
        tokens = server.new_project()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            fleet = seed.seed_fleet(client, ingest=tokens["ingest"], operate=tokens["operate"])
        yield Env(server, tokens, fleet)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any, env: Env) -> Iterator[Any]:
    """A fresh tab under the CSP, logged in with a read token; no CSP violation, no console
    error and no token in any URL by the end."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    problems = with_csp(tab)
    urls: list[str] = []
    tab.on("request", lambda r: urls.append(r.url))
    tab.goto(env.url + "/")
    login(tab, env.tokens["read"])
    tab.wait_for_selector("tr[data-run-id]", timeout=15_000)
    yield tab
    assert problems == []
    assert not [u for u in urls if env.tokens["read"] in u]
    assert all(u.startswith(env.url) for u in urls)
    context.close()


def query(page: Any) -> dict[str, list[str]]:
    return parse_qs(urlparse(page.url).query)


def rows(page: Any) -> list[str]:
    """The run names listed, once the list has answered the current URL."""
    page.wait_for_function("() => document.body.dataset.loaded === '1'")
    return [
        a.inner_text() for a in page.query_selector_all("#runs-table tbody tr td:nth-child(2) a")
    ]


def wait_rows(page: Any, expected: list[str]) -> None:
    page.wait_for_function(
        """(want) => JSON.stringify([...document.querySelectorAll(
             '#runs-table tbody tr td:nth-child(2) a')].map((a) => a.textContent)) === want""",
        arg=json.dumps(expected, separators=(",", ":")),
        timeout=15_000,
    )


def test_runs_page_shows_risk_and_filters_through_the_url(page: Any, env: Env) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    newest_first = rows(page)
    assert sorted(newest_first) == sorted(env.fleet.runs)
    page.select_option("#f-sort", "risk")
    page.wait_for_url("**/?sort=risk")
    page.wait_for_function(
        "() => document.querySelector('#runs-table tbody tr').dataset.health === 'firing'"
    )
    first = page.query_selector_all("#runs-table tbody tr")
    assert [r.get_attribute("data-health") for r in first][:2] == ["firing", "firing"]
    near = page.query_selector("tr[data-health='near'] td.nearest").inner_text()
    assert (
        "attention_logit_high" in near and f"vs bound {seed.NEAR_LOGIT / 0.92:.4g} (margin" in near
    )
    points = page.eval_on_selector_all(
        "#runs-table svg.spark", "(s) => s.map((x) => Number(x.dataset.points))"
    )
    assert len(points) == len(env.fleet.runs) and all(0 < n <= 52 for n in points)
    assert page.query_selector("tr[data-health='firing'] svg.spark circle.spark-bad")  # NaN loss
    page.screenshot(path=str(ARTIFACTS / "fleet-runs-risk.png"), full_page=True)

    # Filters: each one is in the URL and changes the rows; back restores the view.
    page.select_option("#f-status", "failed")
    wait_rows(page, ["nan-loss"])
    assert query(page) == {"sort": ["risk"], "status": ["failed"]}
    page.go_back()
    page.wait_for_function(
        "(n) => document.querySelectorAll('#runs-table tbody tr').length === n",
        arg=len(env.fleet.runs),
    )
    assert query(page) == {"sort": ["risk"]} and page.input_value("#f-status") == ""
    assert len(rows(page)) == len(env.fleet.runs)
    page.fill("#f-q", "healthy")
    page.wait_for_url("**q=healthy**")
    page.wait_for_function("() => document.querySelectorAll('#runs-table tbody tr').length === 2")
    assert sorted(rows(page)) == ["healthy-a", "healthy-b"]
    page.click("#f-reset")
    page.select_option("#f-tag", "hot-lr")
    page.wait_for_url("**tag=hot-lr**")
    wait_rows(page, ["incident", "near-logits"])
    page.select_option("#f-firing", "true")
    page.wait_for_function("() => document.querySelector('#runs-message').textContent !== ''")
    assert "No run matches" in page.inner_text("#runs-message")

    # A shared URL opens the same view; paging is in it too.
    page.goto(env.url + "/?sort=name&limit=2&page=2")
    names = sorted(env.fleet.runs)
    wait_rows(page, names[2:4])
    assert page.inner_text("#page-text") == "page 2 of 3"
    page.click("#page-next")
    wait_rows(page, names[4:6])
    assert query(page)["page"] == ["3"] and page.is_disabled("#page-next")


def test_compare_overlays_the_runs_picked(page: Any, env: Env) -> None:
    picks = ["collapsing", "healthy-a"]
    for name in picks:
        page.check(f"tr[data-run-id='{env.fleet.runs[name]}'] td.pick input")
    assert page.inner_text("#compare-selected") == "Compare selected (2)"
    page.click("#compare-selected")
    page.wait_for_url("**/compare?runs=**")
    wait_rendered(page)
    ids = [env.fleet.runs[n] for n in picks]
    assert query(page)["runs"] == [",".join(ids)]
    names = page.evaluate(
        "(id) => document.getElementById(id)._fullData.filter((t) => t.mode === 'lines')"
        ".map((t) => t.name)",
        "fig-compare",
    )
    assert sorted(names) == sorted(picks)
    chips = page.eval_on_selector_all("#compare-runs li", "(l) => l.map((x) => x.dataset.runId)")
    assert sorted(chips) == sorted(ids)
    shapes = page.evaluate("document.getElementById('fig-compare').layout.shapes.map(s => s.name)")
    assert "event-alert" in shapes  # the collapse alert, in that run's colour

    # Add a run by name, then another quantity: both in the URL, both drawn.
    page.fill("#add-run", "near-logits")
    page.press("#add-run", "Enter")
    page.wait_for_function(
        "(n) => document.querySelectorAll('#compare-runs li').length === n", arg=3
    )
    assert query(page)["runs"] == [",".join([*ids, env.fleet.runs["near-logits"]])]
    page.select_option("#c-quantity", "attention_logit_max")
    page.wait_for_url("**quantity=attention_logit_max**")
    page.wait_for_function(
        "() => document.getElementById('fig-compare').layout.title.text.startsWith('attention')"
    )
    lines = page.evaluate(
        "document.getElementById('fig-compare')._fullData.filter(t => t.mode === 'lines')"
        ".map(t => [t.name, t.x.length])"
    )
    assert [n for n, _ in lines] == [*picks, "near-logits"] and all(x > 100 for _, x in lines)
    page.screenshot(path=str(ARTIFACTS / "fleet-compare.png"), full_page=True)

    # "Compare with" from a run page starts a comparison with that run.
    page.goto(f"{env.url}/runs/{env.fleet.runs['incident']}")
    page.click("#compare-with")
    page.wait_for_url("**/compare?runs=**")
    wait_rendered(page)
    assert page.inner_text("#compare-message") == "Add another run to compare with."


def test_incident_page_from_grafana_link_shows_commands_and_outcome(page: Any, env: Env) -> None:
    run_id = env.fleet.incident_run
    page.goto(f"{env.url}/runs/{run_id}/incidents/latest?rule=grad_norm_spike")
    wait_rendered(page)
    assert page.url == f"{env.url}/incidents/{env.fleet.alert_id}"
    assert page.inner_text("#incident-title") == "grad_norm_spike on incident"
    assert page.inner_text("#incident-outcome") == "rolled back"
    assert "then resolved at step" in page.inner_text("#outcome-detail")
    assert page.inner_text("#targets-table tbody tr td:nth-child(2)") == "global"
    row = page.query_selector(f"tr[data-command-id='{env.fleet.command_id}']")
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    assert cells[0].startswith("msign") and cells[2] == "applied"
    assert cells[3] == str(seed.APPLIED_AT)
    assert "grad_norm (max over 1 alert target(s)): 68.72 →" in cells[4]
    assert cells[5] == "4 matrices; median stable rank 3.4 → 8"
    kinds = page.eval_on_selector_all("#events-table tbody tr", "(r) => r.map(x => x.dataset.kind)")
    for kind in ("alert", "rollback", "skip_step", "quantity_unavailable", "checkpoint_saved"):
        assert kind in kinds
    rollback = page.inner_text("#events-table tr[data-kind='rollback']")
    assert "rolled back to step 192" in rollback and "LR × 0.5" in rollback
    for fid in ("fig-incident-targets", "fig-incident-loss"):
        n = page.evaluate(
            "(id) => document.getElementById(id)._fullData.filter(t => t.mode === 'lines')"
            "[0].x.length",
            fid,
        )
        assert n > 40, fid  # every step of the window
    page.screenshot(path=str(ARTIFACTS / "fleet-incident.png"), full_page=True)

    # The run page links each alert to its incident, and shows the rules' margins.
    page.goto(f"{env.url}/runs/{run_id}")
    wait_rendered(page)
    page.wait_for_selector("#rules-table tr[data-rule='grad_norm_spike']")
    # resolved, though the loss is still above its best (the stall rule trips, not fired)
    assert page.inner_text("#run-health") in ("ok", "near", "unknown", "tripping")
    page.screenshot(path=str(ARTIFACTS / "fleet-run.png"), full_page=True)
    page.click(f"#alerts-table a[href='/incidents/{env.fleet.alert_id}']")
    page.wait_for_url(f"**/incidents/{env.fleet.alert_id}")
    wait_rendered(page)
