"""Synthetic run data in the wire's shapes (docs/contract.md), for the dashboard's tests and
its load benchmark (``benchmarks/dashboard_load.py``): every quantity the run page draws,
for ``blocks`` transformer-like blocks of four attention and two MLP matrices each.

Values are smooth, deterministic functions of (target, step) with a dip late in the run, so
heatmaps and lines show structure; ``nan_every`` scatters NaN/±Inf into every quantity.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from rankguard.server.wire import wire_floats

ATTENTION = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight")
MLP = ("mlp.fc_in.weight", "mlp.fc_out.weight")
COSINE_EDGES = np.linspace(-1.0, 1.0, 42)  # the probe's default 41 bins


def weight_targets(blocks: int, per_block: int = 6) -> list[str]:
    """``per_block`` weight names per block (attention first), ``blocks * per_block`` in all."""
    names = (*ATTENTION, *MLP)[:per_block]
    return [f"model.layers.{b}.{n}" for b in range(blocks) for n in names]


def points(
    *,
    blocks: int,
    steps: int,
    per_block: int = 6,
    every: int = 1,
    start: int = 0,
    nan_every: int = 0,
    wire: bool = True,
) -> dict[str, list[Any]]:
    """One columnar batch (``POST /runs/{id}/points`` body) with every quantity of the page:
    loss and grad_norm (global), stable_rank and sa_sign_diversity per weight target,
    attention_logit_max per block, jacobian_alignment and its gain per adjacent block pair.
    ``wire=False`` keeps NaN/Inf as floats (for ``storage.insert_points``)."""
    step_arr = start + every * np.arange(steps, dtype=np.int64)
    t = np.linspace(0.0, 1.0, steps)
    targets = weight_targets(blocks, per_block)
    cols: dict[str, list[Any]] = {"quantity": [], "target": [], "step": [], "value": []}
    values: list[np.ndarray] = []

    def add(quantity: str, target: str, v: np.ndarray) -> None:
        cols["quantity"].extend([quantity] * steps)
        cols["target"].extend([target] * steps)
        values.append(v)

    add("loss", "global", 4.0 * np.exp(-3 * t) + 0.5 + 0.05 * np.sin(40 * t) + 2.0 * (t > 0.8))
    add("grad_norm", "global", 1.0 + 0.3 * np.cos(17 * t) + 5.0 * (t > 0.78))
    for i, name in enumerate(targets):
        phase = i / max(1, len(targets))
        dip = 1.0 - 0.7 * (t > 0.75 + 0.1 * phase)
        add("stable_rank", name, (8.0 + 4.0 * np.sin(6 * t + 7 * phase)) * dip + 1.0)
        add("sa_sign_diversity", name, np.clip(0.9 - 0.6 * t * phase + 0.05 * np.sin(9 * t), 0, 1))
    for b in range(blocks):
        add("attention_logit_max", f"model.layers.{b}.attn", 5.0 + 20.0 * t**3 * (1 + b % 3))
    for b in range(blocks - 1):
        pair = f"model.layers.{b}->model.layers.{b + 1}"
        a = np.clip(0.3 + 0.5 * t + 0.05 * np.sin(11 * t + b), 0, 1)
        add("jacobian_alignment", pair, a)
        add("jacobian_alignment_gain", pair, a * (1.2 + 0.8 * np.sin(3 * t + b)))
    n_series = len(values)
    flat = np.concatenate(values)
    if nan_every:
        flat[::nan_every] = np.nan
        flat[nan_every // 2 :: nan_every * 3] = np.inf
        flat[nan_every // 3 :: nan_every * 5] = -np.inf
    cols["step"] = np.tile(step_arr, n_series).tolist()
    cols["value"] = wire_floats(flat.tolist()) if wire else flat.tolist()
    return cols


def histograms(
    *, blocks: int, steps: int, every: int = 1, start: int = 0, per_block: int = 6, count: int = 8
) -> list[dict[str, Any]]:
    """``sa_cosine`` histograms for the first two targets at ``count`` evenly spaced steps:
    a distribution that drifts towards +1 over the run."""
    targets = weight_targets(blocks, per_block)[:2]
    centres = (COSINE_EDGES[:-1] + COSINE_EDGES[1:]) / 2
    picks = np.unique(np.linspace(0, steps - 1, count).round().astype(int))
    out = []
    for target in targets:
        for k in picks:
            shift = 0.8 * k / max(1, steps - 1)
            counts = np.round(200 * np.exp(-((centres - shift) ** 2) / 0.08))
            out.append(
                {
                    "quantity": "sa_cosine",
                    "target": target,
                    "rank": 0,
                    "step": int(start + every * k),
                    "edges": COSINE_EDGES.tolist(),
                    "counts": counts.tolist(),
                }
            )
    return out


ALERT_EVENT: dict[str, Any] = {
    "kind": "alert",
    "payload": {
        "kind": "firing",
        "rule": "stable-rank-collapse",
        "severity": "critical",
        "message": "stable rank fell below 2",
        "targets": [{"target": "model.layers.1.attn.q_proj.weight", "value": 1.7}],
        "suggested_action": "Order MSign on run {run_id}",
    },
}
INTERVENTION_EVENT: dict[str, Any] = {
    "kind": "intervention",
    "payload": {"kind": "msign", "args": {"targets": "attention", "engine": "svd"}},
}


class _Response(Protocol):
    status_code: int
    text: str

    def json(self) -> Any: ...


class _Client(Protocol):
    def post(self, url: str, *, json: Any, headers: dict[str, str]) -> _Response: ...


def seed_via_api(
    client: _Client,
    token: str | None,
    *,
    name: str = "seeded",
    blocks: int = 2,
    steps: int = 200,
    nan_every: int = 0,
    events: bool = True,
) -> str:
    """Registers a run and posts its points, histograms and (``events``) an alert at 70% of
    the steps and an intervention at 80%, through the HTTP API; returns the run id. ``client``
    is an ``httpx.Client`` or a Starlette ``TestClient``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def post(url: str, body: Any, expect: tuple[int, ...] = (200, 201)) -> Any:
        resp = client.post(url, json=body, headers=headers)
        if resp.status_code not in expect:
            raise RuntimeError(f"POST {url} -> {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    run_id: str = post("/api/v1/runs", {"name": name})["id"]
    base = f"/api/v1/runs/{run_id}"
    post(base + "/points", points(blocks=blocks, steps=steps, nan_every=nan_every))
    post(base + "/histograms", {"histograms": histograms(blocks=blocks, steps=steps)})
    if events:
        post(base + "/events", {**ALERT_EVENT, "step": int(steps * 0.7)})
        post(base + "/events", {**INTERVENTION_EVENT, "step": int(steps * 0.8)})
    return run_id
