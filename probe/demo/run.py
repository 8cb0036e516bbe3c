"""``rankguard demo``: one failing training run, watched and rescued by rankguard.

1. Starts ``rankguard serve`` on the embedded SQLite default (``./rankguard.db``) in the
   background, or reuses one already listening on the port. It is left running.
2. Trains the demo's scenario (:data:`~.scenario.DEMO`: a small GPT resumed at step 150 with
   100x its learning rate; unprotected, the loss explodes one step later) with the probe
   attached and ``auto_recover=True``, the one switch of the auto-recover profile. MSign alone
   cannot save this run (the rescue benchmark: explosion on every seed, BENCHMARKS.md); the
   probe sees the 100x update at the step it lands, rolls back to its last known-good
   snapshot, skips the batches after it and holds the learning rate down.
3. Prints each alert and each recovery action as it happens, and ends with a table: first
   alert step, the failure step of the unprotected twin (the lead-time benchmark's recording
   of the same scenario and seed, shipped as ``twin.json`` and stated as such), the
   rollbacks, which remedies acted, and the final loss with and without rankguard — then the
   dashboard URL.

Everything here ships in the wheel: ``pip install 'rankguard[server]'`` then ``rankguard demo``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import torch

from ..probe import Probe
from .failure import smoothed_final_loss
from .scenario import DEMO
from .train import train

__all__ = [
    "DemoResult",
    "Twin",
    "remedies",
    "run_demo",
    "stop_started_servers",
    "unprotected_twin",
]

TWIN_FILE = "twin.json"
# Servers this process started and leaves running: referenced so that no Popen is collected
# (and warned about) while its server is meant to outlive the demo.
_DETACHED: list[subprocess.Popen[bytes]] = []
# the probe's own events, as they are printed
_ACTIONS = ("rollback", "rollback_exhausted", "skip_step", "lr_backoff", "qk_clip")


@dataclass
class DemoResult:
    run_id: str
    url: str
    steps_run: int
    final_loss: float
    first_alert_step: int | None
    server_pid: int | None  # None when an already running server was reused
    alerts: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # the probe's actions
    recovery: dict[str, Any] = field(default_factory=dict)  # probe.recovery_summary()


def stop_started_servers() -> None:
    """Stops the servers this process started (tests; the CLI leaves its server running)."""
    while _DETACHED:
        proc = _DETACHED.pop()
        proc.terminate()
        proc.wait(timeout=30)


def ensure_server(port: int, log_dir: Path) -> tuple[str, int | None]:
    """The URL of a no-auth rankguard server on ``port``: an existing one, or a new one
    started in its own session (it outlives the demo). Returns (url, pid or None)."""
    url = f"http://127.0.0.1:{port}"
    try:
        if httpx.get(f"{url}/api/v1/runs", timeout=2).status_code == 200:
            return url, None
        raise SystemExit(
            f"rankguard demo: port {port} is taken by a server that needs a token; "
            "pass --port to use another one"
        )
    except httpx.TransportError:
        pass
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "server.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("rankguard")),
                "serve",
                "--port",
                str(port),
                "--no-auth",
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,  # keep serving the dashboard after the demo exits
        )
    _DETACHED.append(proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return url, proc.pid
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(f"rankguard demo: the server did not start; see {log_dir / 'server.log'}")


class DemoCallback:
    """Attaches the probe (auto-recover on) before the first update and shows the run's
    alerts and recovery actions as it trains. ``on_step`` returns the step to resume from
    after a rollback (the loop's own schedule continues from the restored state)."""

    def __init__(self, url: str, run_name: str, log_dir: Path, total: int, quiet: bool) -> None:
        self.url = url
        self.api = httpx.Client(base_url=f"{url}/api/v1", timeout=10)
        self.run_name = run_name
        self.log_dir = log_dir
        self.total = total
        self.quiet = quiet
        self.probe: Probe | None = None
        self.seen_alerts: set[str] = set()
        self.seen_events: set[int] = set()
        self.first_alert_step: int | None = None
        self.loss = math.nan

    def on_before_step(self, step: int, model: Any, optimizer: Any) -> None:
        if self.probe is None:
            self.probe = Probe(
                model,
                optimizer,
                run=self.run_name,
                server=self.url,
                every=5,
                log_dir=self.log_dir,
                auto_recover=True,  # in the process and on the server's rules
                command_poll_interval=0.25,  # a small model trains ~20 steps/s here
            )

    def on_step(self, step: int, model: Any, optimizer: Any, loss: torch.Tensor) -> int | None:
        assert self.probe is not None
        self.probe.step(loss)
        self.loss = float(loss)  # the demo's own progress bar; not part of the probe
        if step % 10 == 0 or step == self.total - 1:
            self.report()
            self._progress(step)
        resume = self.probe.train_step
        if resume != step + 1:
            self.report()
            return resume
        return None

    def report(self) -> None:
        """Prints the alerts and the recovery actions not shown yet."""
        assert self.probe is not None
        try:
            alerts = self.api.get(f"/runs/{self.probe.run_id}/alerts").json()["data"]
            events = self.api.get(f"/runs/{self.probe.run_id}/events").json()["data"]
        except (httpx.HTTPError, KeyError, ValueError):
            return  # the demo's display must not stop training either
        for alert in alerts:
            if alert["id"] in self.seen_alerts:
                continue
            self.seen_alerts.add(alert["id"])
            if self.first_alert_step is None or alert["fired_step"] < self.first_alert_step:
                self.first_alert_step = alert["fired_step"]
            first = alert["targets"][0]["target"] if alert["targets"] else "-"
            action = " -> command ordered" if alert.get("command_id") else ""
            self._print(
                f"\n  ALERT [{alert['severity']}] {alert['rule_name']} at step "
                f"{alert['fired_step']} (moved first: {first}){action}"
            )
        for event in events:
            if event["kind"] in _ACTIONS and event["id"] not in self.seen_events:
                self.seen_events.add(event["id"])
                self._print(f"\n  {describe(event)}")

    def _progress(self, step: int) -> None:
        width = 30
        done = int(width * (step + 1) / self.total)
        bar = "#" * done + "-" * (width - done)
        self._print(
            f"\r  [{bar}] step {step + 1}/{self.total}  loss {self.loss:7.3f}  "
            f"alerts {len(self.seen_alerts)}",
            end="",
        )

    def _print(self, text: str, end: str = "\n") -> None:
        if not self.quiet:
            print(text, end=end, file=sys.stderr, flush=True)


def describe(event: dict[str, Any]) -> str:
    """One line for one of the probe's recovery events."""
    p, step = event["payload"], event["step"]
    if event["kind"] == "rollback":
        skipped = p.get("skipped") or ["?", "?"]
        return (
            f"ROLLBACK at step {step} ({p.get('reason')}): restored the state of step "
            f"{p.get('restored_step')}, skipped batches {skipped[0]}-{skipped[1]}, learning "
            f"rate x{p.get('lr_factor', 1.0):.3g} (held), loss {_num(p.get('loss_before'))} -> "
            f"{_num(p.get('loss_after'))}"
        )
    if event["kind"] == "lr_backoff":
        return f"LR BACKOFF at step {step}: x{p.get('factor', 1.0):.3g} (held)"
    if event["kind"] == "qk_clip":
        return f"QK-CLIP at step {step}: {p.get('heads_clipped')} head(s) over tau={p.get('tau')}"
    if event["kind"] == "skip_step":
        return (
            f"SKIP-STEP at step {step}: update dropped (gradient norm {_num(p.get('grad_norm'))})"
        )
    return f"ROLLBACKS EXHAUSTED at step {step}: incident {p.get('incident')}"


def _num(value: Any) -> str:
    return "NaN/inf" if value is None else f"{float(value):.3f}"


@dataclass(frozen=True)
class Twin:
    """The unprotected run of the demo's scenario and seed, and its healthy control, as
    recorded by the lead-time benchmark (``benchmarks/early_warning.py record``) and
    summarised into the package's ``twin.json`` by ``python -m benchmarks.demo``."""

    failure_step: int | None
    failure_kind: str | None
    final_loss: float  # trailing-25 mean; inf once the loss went non-finite
    control: str
    control_final_loss: float


def unprotected_twin(seed: int) -> Twin | None:
    """The recorded twin, or None when there is no recording of this seed (or of another
    scenario than the one the demo trains)."""
    recorded = json.loads(resources.files(__package__).joinpath(TWIN_FILE).read_text())
    if recorded.get("scenario") != DEMO.name:
        return None
    twin = recorded["seeds"].get(str(seed))
    if twin is None:
        return None
    return Twin(
        failure_step=twin["failure_step"],
        failure_kind=twin["failure_kind"],
        final_loss=float(twin["final_loss"]),
        control=recorded["control"],
        control_final_loss=float(twin["control_final_loss"]),
    )


def run_demo(
    *, port: int = 8000, seed: int = 0, max_steps: int | None = None, quiet: bool = False
) -> DemoResult:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    log_dir = Path("rankguard_logs")
    url, pid = ensure_server(port, log_dir)
    scenario = DEMO
    total = scenario.steps if max_steps is None else min(max_steps, scenario.steps)
    out = sys.stderr
    if not quiet:
        started = f"started (pid {pid})" if pid else "already running"
        print(f"rankguard server {started} at {url}", file=out)
        print(f"training {scenario.name} (seed {seed}): {scenario.mechanism}", file=out)
    callback = DemoCallback(
        url, f"demo-{scenario.name}-{time.strftime('%H%M%S')}", log_dir, total, quiet
    )
    result = train(scenario, seed, callbacks=[callback], max_steps=total, evaluate_at_end=False)
    assert callback.probe is not None
    recovery = callback.probe.recovery_summary()
    report = callback.probe.close(timeout=30)
    run_id = callback.probe.run_id
    time.sleep(0.5)  # let the last batch's alerts and events settle before the final read
    callback.report()
    api = callback.api
    try:
        alerts = api.get(f"/runs/{run_id}/alerts").json()["data"]
        commands = api.get(f"/runs/{run_id}/commands").json()["data"]
        events = api.get(f"/runs/{run_id}/events").json()["data"]
        api.post(f"/runs/{run_id}/finish", json={"status": "finished"})
    finally:
        api.close()
    first_alert = min((a["fired_step"] for a in alerts), default=None)
    demo = DemoResult(
        run_id=run_id,
        url=f"{url}/runs/{run_id}",
        steps_run=result.steps_run,
        final_loss=smoothed_final_loss(result.losses),
        first_alert_step=first_alert,
        server_pid=pid,
        alerts=alerts,
        commands=commands,
        events=[e for e in events if e["kind"] in _ACTIONS],
        recovery=recovery,
    )
    if not quiet:
        print(file=out)
        if not report.delivered_all:
            print(str(report), file=out)
        print_table(demo, unprotected_twin(seed), seed)
        print(f"\ndashboard: {demo.url}", file=out)
        if pid:
            print(f"the server keeps running (pid {pid}); stop it with: kill {pid}", file=out)
    return demo


def remedies(demo: DemoResult) -> dict[str, int]:
    """How often each remedy acted: the probe's own actions and the server's commands."""
    acted = {"rollback": 0, "skip_step": 0, "lr_backoff": 0, "qk_clip": 0, "msign": 0}
    for event in demo.events:
        if event["kind"] in acted:
            acted[event["kind"]] += 1
    acted["skip_step"] = int(demo.recovery.get("skipped_updates", 0))
    for c in demo.commands:
        if c["state"] != "applied":
            continue
        if c["kind"] in ("msign", "qk_clip"):
            acted[c["kind"]] += 1
        elif c["kind"] == "scale_lr":
            acted["lr_backoff"] += 1
        elif c["kind"] == "rollback":
            acted["rollback"] += int(bool((c.get("result") or {}).get("rolled_back")))
    return acted


def print_table(demo: DemoResult, twin: Twin | None, seed: int) -> None:
    rollbacks = [e for e in demo.events if e["kind"] == "rollback"]
    acted = ", ".join(f"{k} {v}" for k, v in remedies(demo).items() if v) or "none"
    rows = [
        ("first alert step", _fmt(demo.first_alert_step)),
        (
            "rollbacks",
            "; ".join(
                f"at step {e['step']} to the state of step {e['payload']['restored_step']}"
                f" (batches {e['payload']['skipped'][0]}-{e['payload']['skipped'][1]} skipped)"
                for e in rollbacks
            )
            or "none",
        ),
        ("remedies that acted", acted),
        ("final loss with rankguard (mean of last 25)", f"{demo.final_loss:.3f}"),
    ]
    if twin is None:
        rows.append(
            (
                "the unprotected twin",
                f"not recorded for seed {seed} (python -m benchmarks.early_warning record "
                f"--scenarios {DEMO.name},{DEMO.control} --seeds {seed}, then "
                "python -m benchmarks.demo)",
            )
        )
    else:
        recorded = "recorded by benchmarks/early_warning.py"
        failure = f"{_fmt(twin.failure_step)} ({twin.failure_kind or 'no failure'}; {recorded})"
        rows[1:1] = [("failure step of the unprotected twin", failure)]
        rows += [
            ("final loss without rankguard", _loss(twin)),
            (f"final loss of the healthy control {twin.control}", f"{twin.control_final_loss:.3f}"),
        ]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'':-<{width + 40}}", file=sys.stderr)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=sys.stderr)
    print(f"{'':-<{width + 40}}", file=sys.stderr)


def _loss(twin: Twin) -> str:
    if math.isfinite(twin.final_loss):
        return f"{twin.final_loss:.3f}"
    return f"diverged (non-finite loss from step {twin.failure_step})"


def _fmt(value: int | None) -> str:
    return "none" if value is None else str(value)
