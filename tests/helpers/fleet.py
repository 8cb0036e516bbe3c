"""A small fleet of runs through the HTTP API, for the fleet pages' tests (runs list, compare,
incident): runs of every health, status and tag, with the server's own default rules
judging them, and one incident that an operator remedied (MSign applied, a rollback, a
skipped step, a quantity that became unavailable) before it resolved.

``client`` is an ``httpx.Client`` or a Starlette ``TestClient`` with ``base_url`` at the
server; tokens are passed per call (never in a URL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rankguard.server.alerts.pack import ATTENTION_LOGIT_HIGH, default_rules
from rankguard.server.wire import wire_floats

STEPS = 240
TARGETS = tuple(f"model.layers.{b}.attn.{m}.weight" for b in range(2) for m in ("q_proj", "k_proj"))
SPIKE_AT = 200  # the incident run's gradient-norm spike (fires grad_norm_spike)
APPLIED_AT = SPIKE_AT + 5  # the step the probe applied MSign and rolled back at
# The near-logits run ends 8% under the pack's attention-logit bound: "near", not firing.
NEAR_LOGIT = 0.92 * next(
    float(r.threshold or 0) for r in default_rules() if r.name == ATTENTION_LOGIT_HIGH
)


def _batch(
    steps: range, *, loss: Any, grad: Any, logit: float, sr_drop: float = 1.0, sr: float = 8.0
) -> dict[str, list[Any]]:
    """loss and grad_norm (global), stable_rank per target, attention_logit_max per block,
    at ``steps``; ``loss``/``grad`` are functions of the step."""
    cols: dict[str, list[Any]] = {"quantity": [], "target": [], "step": [], "value": []}

    def add(quantity: str, target: str, values: list[float]) -> None:
        cols["quantity"] += [quantity] * len(steps)
        cols["target"] += [target] * len(steps)
        cols["step"] += list(steps)
        cols["value"] += wire_floats(values)

    add("loss", "global", [float(loss(s)) for s in steps])
    add("grad_norm", "global", [float(grad(s)) for s in steps])
    for i, name in enumerate(TARGETS):
        add("stable_rank", name,
            [(sr + i) * (sr_drop if s > 150 else 1.0) + 0.01 * (s % 7) for s in steps])  # fmt: skip
    for b in range(2):
        add("attention_logit_max", f"model.layers.{b}.attn",
            [logit * (0.5 + 0.5 * s / STEPS) for s in steps])  # fmt: skip
    return cols


@dataclass
class Fleet:
    runs: dict[str, str] = field(default_factory=dict)  # name -> id
    incident_run: str = ""
    alert_id: str = ""
    command_id: str = ""


def _post(client: Any, url: str, token: str, body: Any) -> Any:
    resp = client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    if resp.status_code not in (200, 201):
        raise RuntimeError(f"POST {url} -> {resp.status_code}: {resp.text[:400]}")
    return resp.json()


def _get(client: Any, url: str, token: str) -> Any:
    resp = client.get(url, headers={"Authorization": f"Bearer {token}"})
    resp.raise_for_status()
    return resp.json()


def _run(client: Any, token: str, name: str, tags: list[str]) -> str:
    return str(_post(client, "/api/v1/runs", token, {"name": name, "config": {"tags": tags}})["id"])


def seed_fleet(client: Any, *, ingest: str, operate: str) -> Fleet:
    """Registers the fleet and returns its ids. Needs the server's alert rules on."""
    fleet = Fleet()
    smooth = lambda s: 4.0 * np.exp(-s / 80) + 0.6  # noqa: E731
    calm = lambda s: 1.0 + 0.05 * np.sin(s)  # noqa: E731
    kinds: list[tuple[str, list[str], dict[str, Any], str | None]] = [
        ("healthy-a", ["baseline", "gpt"], {"logit": 10.0, "sr": 6.0}, None),
        ("healthy-b", ["gpt"], {"logit": 12.0, "sr": 7.0}, "finished"),
        ("near-logits", ["gpt", "hot-lr"], {"logit": NEAR_LOGIT, "sr": 9.0}, None),
        ("collapsing", ["gpt"], {"logit": 10.0, "sr_drop": 0.08}, None),
        ("nan-loss", ["fp16"], {"logit": 10.0, "sr": 5.0}, "failed"),
    ]
    for name, tags, shape, end in kinds:
        run_id = _run(client, ingest, name, tags)
        fleet.runs[name] = run_id
        loss = (lambda s: np.nan if s >= STEPS - 5 else smooth(s)) if name == "nan-loss" else smooth
        _post(client, f"/api/v1/runs/{run_id}/points", ingest,
              _batch(range(STEPS), loss=loss, grad=calm, **shape))  # fmt: skip
        if end is not None:
            _post(client, f"/api/v1/runs/{run_id}/finish", ingest, {"status": end})
    _seed_incident(client, fleet, ingest=ingest, operate=operate)
    return fleet


def _seed_incident(client: Any, fleet: Fleet, *, ingest: str, operate: str) -> None:
    """A gradient norm growing 1.6x a step from SPIKE_AT fires the rule (its EMA lags); while
    it fires the operator orders MSign, the probe applies it at APPLIED_AT (the last hot step)
    and rolls back; the gradient norm is back to normal after it and the alert resolves."""
    run_id = _run(client, ingest, "incident", ["gpt", "hot-lr"])
    fleet.runs["incident"] = fleet.incident_run = run_id
    base = f"/api/v1/runs/{run_id}"
    hot = range(SPIKE_AT, SPIKE_AT + 6)
    loss = lambda s: 4.0 * np.exp(-s / 80) + 0.6 + (0.5 * (s - SPIKE_AT + 1) if s in hot else 0)  # noqa: E731
    grad = lambda s: 1.6 ** (s - SPIKE_AT + 4) if s in hot else 1.0 + 0.05 * np.sin(s)  # noqa: E731
    _post(client, base + "/points", ingest,
          _batch(range(SPIKE_AT + 6), loss=loss, grad=grad, logit=10.0))  # fmt: skip
    # the peers' gradient-norm detectors of the pack fire on the same spike: the incident is
    # the pack's own rule
    alerts = _get(client, base + "/alerts", operate)["data"]
    [alert] = [a for a in alerts if a["rule_name"] == "grad_norm_spike"]
    fleet.alert_id = alert["id"]
    msign = {"kind": "msign", "args": {"targets": "attention", "engine": "svd"}}
    command = _post(client, base + "/commands", operate, msign)
    fleet.command_id = command["id"]
    _post(client, base + "/commands/claim", ingest, {})
    matrices = [{"name": t, "shape": [8, 8], "rank": 8, "stable_rank_before": 1.4 + i,
                 "stable_rank_after": 8.0, "frobenius_before": 2.0, "frobenius_after": 2.0,
                 "spectral_norm_before": 1.7, "spectral_norm_after": 0.7, "exact_stats": True}
                for i, t in enumerate(TARGETS)]  # fmt: skip
    _post(client, f"{base}/commands/{command['id']}/ack", ingest,
          {"state": "applied", "step": APPLIED_AT,
           "result": {"kind": "msign", "options": {"engine": "svd"}, "matrices": matrices,
                      "seconds": 0.01}})  # fmt: skip
    for kind, step, payload in (
        ("rollback", APPLIED_AT, {"restored_step": SPIKE_AT - 8,
                                  "skipped": [SPIKE_AT - 8, APPLIED_AT],
                                     "lr_factor": 0.5, "loss_before": 7.1, "loss_after": 1.2}),
        ("skip_step", SPIKE_AT + 2, {"reason": "loss spike 4.6x its EMA"}),
        ("quantity_unavailable", SPIKE_AT + 1,
         {"quantity": "jacobian_alignment", "reason": "no blocks found"}),
        ("checkpoint_saved", SPIKE_AT + 3, {"path_hint": "ring slot 3", "bytes": 1048576}),
    ):  # fmt: skip
        _post(client, base + "/events", ingest, {"kind": kind, "step": step, "payload": payload})
    _post(client, base + "/points", ingest,
          _batch(range(SPIKE_AT + 6, STEPS), loss=loss, grad=grad, logit=10.0))  # fmt: skip
