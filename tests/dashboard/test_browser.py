"""The dashboard in headless Chromium against a real ``rankguard serve`` process.

Checks in the DOM (not only HTTP 200s): every figure is drawn with data and carries the
alert/intervention markers, the token never appears in a URL, a read token cannot order
MSign, and with an operate token the MSign control follows a command to ``applied`` while a
probe is attached. Screenshots of each page go to ``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import inspect
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import synthetic
from helpers.browser import ARTIFACTS, CHROMIUM, chromium, login, wait_rendered, with_csp

from rankguard.dashboard.page import FIGURE_IDS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ADMIN = "rg_browser-test-admin-token-0123456789"
BLOCKS, STEPS = 2, 200  # 12 weight targets x 200 steps
HEATMAP_ROWS = BLOCKS * 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    read: str
    operate: str
    ingest: str

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.fail(f"headless Chromium not found at {CHROMIUM} (set RANKGUARD_CHROMIUM)")
    tmp = tmp_path_factory.mktemp("rg-browser")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Without the server's own alert rules: the tests count the alert events they seed.
    env = {**os.environ, "RANKGUARD_ADMIN_TOKEN": ADMIN, "RANKGUARD_ALERTS_ENABLED": "0",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "rankguard.server.cli", "serve",
            "--port", str(port),
            "--database-url", f"sqlite:///{tmp / 'rg.db'}",
            "--log-level", "warning",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"server did not start:\n{(tmp / 'server.log').read_text()}")
            time.sleep(0.2)
        tokens = {}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            for scope in ("read", "operate", "ingest"):
                resp = admin.post(
                    "/api/v1/tokens",
                    json={"name": scope, "project": "default", "scopes": [scope]},
                )
                assert resp.status_code == 201, resp.text
                tokens[scope] = resp.json()["token"]
        yield Server(url, tokens["read"], tokens["operate"], tokens["ingest"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def seeded(server: Server) -> str:
    with server.client(server.ingest) as client:
        return synthetic.seed_via_api(
            client, server.ingest, name="seeded", blocks=BLOCKS, steps=STEPS
        )


def probe_speaks_http() -> bool:
    """True once the probe ships to a server itself (server=..., an HTTP transport)."""
    from rankguard.probe import Probe
    from rankguard.probe import probe as probe_module

    return "server" in inspect.signature(Probe).parameters and hasattr(
        probe_module, "HttpTransport"
    )


class FakeProbe(threading.Thread):
    """Stands in for a probe until the real one has its HTTP transport: keeps the run live
    (a loss point per tick) and claims and acknowledges commands as the probe would."""

    def __init__(self, server: Server, run_id: str) -> None:
        super().__init__(daemon=True)
        self.server, self.run_id = server, run_id
        self.stop = threading.Event()
        self.step = STEPS
        self.errors: list[str] = []

    def run(self) -> None:
        base = f"/api/v1/runs/{self.run_id}"
        with self.server.client(self.server.ingest) as c:
            while not self.stop.is_set():
                try:
                    c.post(
                        base + "/points",
                        json={
                            "quantity": ["loss"],
                            "target": ["global"],
                            "step": [self.step],
                            "value": [0.7],
                        },
                    )
                    for cmd in c.post(base + "/commands/claim", json={}).json()["data"]:
                        ack = {
                            "state": "applied",
                            "step": self.step,
                            "result": {
                                "targets": ["model.layers.0.attn.q_proj.weight"],
                                "engine": cmd["args"].get("engine"),
                            },
                        }
                        c.post(f"{base}/commands/{cmd['id']}/ack", json=ack).raise_for_status()
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                self.step += 1
                self.stop.wait(0.3)


class RealProbe(threading.Thread):
    """A tiny model training with ``rankguard.probe.Probe(server=...)`` in the background."""

    def __init__(self, server: Server, log_dir: Path) -> None:
        super().__init__(daemon=True)
        import torch
        from torch import nn

        from rankguard.probe import Probe

        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.probe = Probe(self.model, self.opt, run="browser-probe", server=server.url,
                           token=server.ingest, every=1, log_dir=log_dir)  # fmt: skip
        self.run_id = self.probe.run_id
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        import torch

        try:
            while not self.stop.is_set():
                loss = self.model(torch.randn(16, 8)).pow(2).mean()
                loss.backward()
                self.opt.step()
                self.opt.zero_grad()
                self.probe.step(loss)
                self.stop.wait(0.05)
        except Exception as exc:  # reported by the test, not lost in the thread
            self.errors.append(repr(exc))
        finally:
            self.probe.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


FIGURE_STATE = """(id) => {
  const d = document.getElementById(id);
  if (!d || !d.data) return null;
  const len = (a) => (a && a.length !== undefined ? a.length : 0);
  // _fullData holds what Plotly drew (base64 typed arrays decoded), in trace order.
  return {
    container: Boolean(d.querySelector('.plot-container')),
    traces: d._fullData.map((t) => ({type: t.type, name: t.name || '',
      x: len(t.x), y: len(t.y), z: len(t.z), zcols: t.z ? len(t.z[0]) : 0})),
    shapes: (d.layout.shapes || []).map((s) => s.name || ''),
  };
}"""


def test_pages_render_every_figure_and_msign_reaches_applied(
    server: Server, seeded: str, browser: Any, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    # Under the server's CSP. The browser logs refused fetches (the 401 that asks for a
    # token, the 403 of a read token ordering MSign) as console errors; those are expected,
    # anything else (a CSP violation included) is not.
    console_errors = with_csp(page)

    # Runs list: asks for a token, then lists the run with its step, loss and alert count.
    page.goto(server.url + "/")
    login(page, server.read)
    row = page.wait_for_selector(f'tr[data-run-id="{seeded}"]', timeout=15_000)
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    # pick, run, project, status, health, nearest rule, loss, last step, last loss, firing
    assert cells[1] == "seeded" and cells[3] == "running"
    assert cells[7] == str(STEPS - 1)
    assert cells[9] == "0"  # the seeded alert is an event: no row of the alerts table fires
    page.screenshot(path=str(ARTIFACTS / "dashboard-runs.png"), full_page=True)

    # Run page (same tab: the token stays in sessionStorage, no second prompt).
    page.click(f'tr[data-run-id="{seeded}"] a')
    wait_rendered(page)
    for fid in FIGURE_IDS:
        state = page.evaluate(FIGURE_STATE, fid)
        assert state is not None, f"{fid}: no plot"
        assert state["container"], f"{fid}: no .plot-container"
        assert state["traces"], f"{fid}: no traces"
        assert {"event-alert", "event-intervention"} <= set(state["shapes"]), (fid, state["shapes"])
        first = state["traces"][0]
        if fid in ("fig-stable-rank", "fig-sa-sign-diversity"):
            assert first["type"] == "heatmap"
            assert (first["z"], first["zcols"], first["y"]) == (HEATMAP_ROWS, STEPS, HEATMAP_ROWS)
        elif fid == "fig-sa-cosine":
            assert first["type"] == "heatmap" and first["z"] == 41 and first["zcols"] > 1
        else:
            assert first["x"] == STEPS and first["y"] == STEPS, (fid, first)
    assert page.inner_text("#alerts-table tbody").count("stable-rank-collapse") == 1
    assert f"Order MSign on run {seeded}" in page.inner_text("#alerts-table")
    page.screenshot(path=str(ARTIFACTS / "dashboard-run.png"), full_page=True)

    # A read token cannot order MSign: the page says so (403), nothing is queued.
    page.select_option("#msign-targets", "all_2d")
    page.click("#msign-button")
    assert page.is_visible("#msign-confirm")
    page.click("#msign-confirm-button")
    page.wait_for_selector('#msign-state[data-state="forbidden"]', timeout=15_000)
    with server.client(server.read) as c:
        assert c.get(f"/api/v1/runs/{seeded}/commands").json()["count"] == 0

    # With an attached probe and an operate token: queued -> delivered -> applied.
    if probe_speaks_http():
        worker: FakeProbe | RealProbe = RealProbe(server, tmp_path / "probe-logs")
        run_id = worker.run_id
    else:
        worker = FakeProbe(server, seeded)
        run_id = seeded
    worker.start()
    try:
        deadline = time.monotonic() + 60
        with server.client(server.read) as c:
            while c.get(f"/api/v1/runs/{run_id}").status_code != 200:
                assert time.monotonic() < deadline, "the probe never registered its run"
                time.sleep(0.2)
        page.evaluate("sessionStorage.clear()")  # as the 'forget token' button does
        page.goto(f"{server.url}/runs/{run_id}")
        login(page, server.operate)
        wait_rendered(page)
        page.select_option("#msign-targets", "all_2d")
        page.select_option("#msign-engine", "newton_schulz")
        page.click("#msign-button")
        assert "newton_schulz" in page.inner_text("#msign-confirm-text")
        page.click("#msign-confirm-button")
        page.wait_for_selector('#msign-state[data-state="applied"]', timeout=60_000)
        assert "applied at step" in page.inner_text("#msign-state")
        # The applied command becomes an intervention marker after the refresh.
        page.wait_for_function(
            """(n) => (document.getElementById('fig-loss').layout.shapes || [])
                 .filter((s) => s.name === 'event-intervention').length >= n""",
            arg=2 if run_id == seeded else 1,
            timeout=90_000,
        )
        page.screenshot(path=str(ARTIFACTS / "dashboard-msign-applied.png"), full_page=True)
    finally:
        worker.stop.set()
        worker.join(timeout=30)
    assert worker.errors == []
    with server.client(server.read) as c:
        [command] = c.get(f"/api/v1/runs/{run_id}/commands").json()["data"]
    assert command["state"] == "applied"
    assert command["args"] == {"targets": "all_2d", "engine": "newton_schulz"}

    # No token material in any URL the page requested.
    for token in (server.read, server.operate):
        assert not [u for u in urls if token in u]
    assert all(u.startswith(server.url) for u in urls), [
        u for u in urls if not u.startswith(server.url)
    ]
    assert console_errors == []
    context.close()
