"""The names that cross package boundaries agree (docs/contract.md): every quantity the
server's rule pack, its ``/metrics`` exposition and the dashboard's figures name is one the
probe really emits. The probe's names are read from what it sends, not from a list, so a
rename on either side fails here."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import torch
import torch.nn.functional as F
from helpers.models import TinyGPT

from rankguard.dashboard import figures
from rankguard.probe import Probe
from rankguard.probe.quantities import REGISTRY
from rankguard.probe.transport import MemoryTransport
from rankguard.probe.wire import iter_points
from rankguard.server import exposition
from rankguard.server.alerts import pack


def _emitted_names() -> set[str]:
    """Every wire name a probe with every quantity on emits over a few sampled steps."""
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    transport = MemoryTransport()
    probe = Probe(
        model,
        opt,
        run="contract",
        transport=transport,
        every=1,
        jacobian_every=1,
        quantities=tuple(REGISTRY),
    )
    for _ in range(3):
        idx = torch.randint(0, 32, (4, 8))
        logits = model(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.step(loss)
    probe.close()
    names = {p.quantity for p in iter_points(transport.batches)}
    names |= {h["quantity"] for b in transport.batches for h in b.get("histograms", [])}
    return names


def _figure_quantities() -> set[str]:
    names: set[str] = set()
    for info in pkgutil.iter_modules(figures.__path__):
        module = importlib.import_module(f"{figures.__name__}.{info.name}")
        for attr in ("QUANTITY", "GAIN_QUANTITY"):
            value = getattr(module, attr, None)
            if isinstance(value, str):
                names.add(value)
    return names


def test_every_quantity_named_downstream_is_emitted_by_the_probe() -> None:
    emitted = _emitted_names()
    downstream = {
        "rule pack": {r.quantity for r in pack.default_rules()},
        "exposition": set(exposition.LOW_IS_WORSE),
        "figures": _figure_quantities(),
    }
    assert downstream["figures"], "no figure module was found: the scan is broken"
    for where, names in downstream.items():
        assert names <= emitted, (
            f"{where} names quantities the probe never emits: {names - emitted}"
        )


def test_the_grafana_update_ratio_bound_is_the_packs() -> None:
    # the panel's red line and its text say where the server's rule fires
    board = Path(__file__).resolve().parents[1] / "dashboard/grafana/dashboards/rankguard.json"
    (panel,) = [p for p in json.loads(board.read_text())["panels"] if "update_ratio" in str(p)]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    (rule,) = [r for r in pack.default_rules() if r.name == pack.UPDATE_RATIO_HIGH]
    assert [s["value"] for s in steps if s["value"] is not None] == [round(rule.threshold, 3)]
    assert f"above {round(rule.threshold, 3)}" in panel["description"]
