"""The Probe end to end on a tiny GPT: schedules, hooks, failures, state, dtypes."""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import pytest
import torch
from torch import nn

from rankguard.probe import Probe
from rankguard.probe.exceptions import ConfigError, ConfigTypeError, QuantityError
from rankguard.probe.quantities import REGISTRY
from rankguard.probe.quantities.base import Quantity, StepContext
from rankguard.probe.sink import MemorySink
from rankguard.probe.wire import iter_points


def probe_hooks(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def make_probe(model: nn.Module, tmp_path, **kwargs) -> Probe:
    kwargs.setdefault("sink", MemorySink())
    return Probe(model, run="test", log_dir=tmp_path, strict=kwargs.pop("strict", True), **kwargs)


def test_every_quantity_reported(tiny_gpt, tmp_path, train) -> None:
    probe = make_probe(tiny_gpt, tmp_path, every=2, jacobian_every=4)
    train(tiny_gpt, probe, 5)
    latest = probe.latest()
    quantities = {q for q, _ in latest}
    # the bound is for attention reachable by its projections only: TinyGPT's calls SDPA
    everything = {name for cls in REGISTRY.values() for name in cls.wire_names()}
    expected = everything - {"sa_cosine", "attention_logit_bound"}
    assert expected | {"loss"} == quantities
    assert latest[("jacobian_alignment", "transformer.h.0->transformer.h.1")] >= 0
    assert ("attention_logit_max", "transformer.h.0.attn") in latest
    assert ("update_ratio", "transformer.h.1.mlp.c_fc.weight") in latest
    # stable rank matches the exact value on the current weights
    w = tiny_gpt.transformer.h[1].mlp["c_fc"].weight.detach()
    s = torch.linalg.svdvals(w)
    sr = latest[("stable_rank", "transformer.h.1.mlp.c_fc.weight")]
    assert sr == pytest.approx((s.square().sum() / s[0] ** 2).item(), rel=0.01)
    probe.close()


def test_sampling_schedule_and_loss_every_step(tiny_gpt, tmp_path, train) -> None:
    sink = MemorySink()
    probe = make_probe(tiny_gpt, tmp_path, every=3, sink=sink, quantities=["stable_rank"])
    losses = train(tiny_gpt, probe, 7)
    probe.close()
    points = list(iter_points(sink.batches))
    assert sorted({p.step for p in points if p.quantity == "stable_rank"}) == [0, 3, 6]
    loss_points = sorted((p.step, p.value) for p in points if p.quantity == "loss")
    assert [s for s, _ in loss_points] == list(range(7))  # flushed at samples and at close
    assert [v for _, v in loss_points] == pytest.approx(losses)


def test_hooks_only_around_sampled_steps_and_close_removes_all(tiny_gpt, tmp_path, train) -> None:
    probe = make_probe(tiny_gpt, tmp_path, every=4, quantities=["sa_sign_diversity", "grad_norm"])
    assert probe_hooks(tiny_gpt) > 0  # armed for step 0
    train(tiny_gpt, probe, 1)
    assert probe_hooks(tiny_gpt) == 0  # steps 1-3: nothing live
    train(tiny_gpt, probe, 2)
    assert probe_hooks(tiny_gpt) == 0
    train(tiny_gpt, probe, 1)
    assert probe_hooks(tiny_gpt) > 0  # armed for step 4
    probe.close()
    assert probe_hooks(tiny_gpt) == 0
    for m in tiny_gpt.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    probe.close()  # idempotent
    probe.step(1.0)  # and a closed probe ignores further steps
    assert probe_hooks(tiny_gpt) == 0


def test_update_ratio_is_the_sampled_steps_own_update(tiny_gpt, tmp_path) -> None:
    """At every=3 the ratio at step 3 is ‖W₃ − W₂‖/‖W₂‖ (one optimizer step), not the
    change since the last sample; no copy is held between samples or after close."""
    probe = make_probe(tiny_gpt, tmp_path, every=3, quantities=["update_ratio"])
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=0.5)
    w = tiny_gpt.transformer.h[0].mlp.c_fc.weight
    weights = []
    for _ in range(4):
        weights.append(w.detach().clone())
        idx = torch.randint(0, 32, (2, 8))
        tiny_gpt(idx).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.step()
        held = probe.quantities[0]._before  # type: ignore[attr-defined]
        assert (len(held) > 0) == (probe.step_count % 3 == 0)  # armed only before a sample
    got = probe.latest()[("update_ratio", "transformer.h.0.mlp.c_fc.weight")]
    expected = (w.detach() - weights[3]).norm() / weights[3].norm()
    assert got == pytest.approx(expected.item(), rel=1e-5)
    since_sample = (w.detach() - weights[1]).norm() / weights[1].norm()
    assert got != pytest.approx(since_sample.item(), rel=1e-2)
    for _ in range(2):  # steps 4-5: armed at the end of step 5 for step 6
        probe.step()
    assert probe.quantities[0]._before  # type: ignore[attr-defined]
    probe.close()
    assert probe.quantities[0]._before == {}  # type: ignore[attr-defined]


def test_context_manager_closes(tiny_gpt, tmp_path, train) -> None:
    with make_probe(tiny_gpt, tmp_path, every=1) as probe:
        train(tiny_gpt, probe, 2)
    assert probe_hooks(tiny_gpt) == 0
    assert probe.transport.sink.closed  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ConfigError, "every: must be >= 1, got 0"),
        ({"every": 2.5}, ConfigTypeError, "every"),
        ({"quantities": ["stable_rank", "bogus"]}, ConfigError, r"bogus.*valid:.*stable_rank"),
        ({"targets": ["*nope*"]}, ConfigError, r"include.*\*nope\*"),
        ({"jacobian_every": -1}, ConfigError, "jacobian_every"),
        ({"blocks": ["no.such.block"]}, ConfigError, "no.such.block"),
        ({"schedules": {"bogus": 3}}, ConfigError, "bogus"),
        ({"probe_batch": [1, 2]}, ConfigTypeError, "probe_batch"),
        ({"activations_per_rank": "yes"}, ConfigTypeError, "activations_per_rank"),
        ({"command_every": 0}, ConfigError, "command_every"),
        ({"power_iterations": 1, "lanczos": True}, ConfigError, r"power_iterations: must be >= 2"),
    ],
)
def test_errors_at_construction(tiny_gpt, tmp_path, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        make_probe(tiny_gpt, tmp_path, **kwargs)
    assert probe_hooks(tiny_gpt) == 0


def test_no_2d_weights_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no 2-D weight"):
        make_probe(nn.Sequential(nn.LayerNorm(4), nn.ReLU()), tmp_path)
    with pytest.raises(ConfigTypeError, match="model"):
        Probe("not a model", run="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="run"):
        Probe(nn.Linear(2, 2), run="")


def test_jacobian_requested_without_blocks_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="blocks"):
        make_probe(nn.Linear(3, 3), tmp_path, quantities=["jacobian_alignment"])
    # the default set silently goes without it
    probe = make_probe(nn.Linear(3, 3), tmp_path)
    assert "jacobian_alignment" not in [q.name for q in probe.quantities]
    probe.close()


class Exploding(Quantity):
    name: ClassVar[str] = "stable_rank"  # reuses a registered name for the test

    def compute(self, ctx: StepContext) -> list:
        raise RuntimeError("boom")


def test_failing_quantity_is_skipped_and_logged_once(tiny_gpt, tmp_path, train, caplog) -> None:
    probe = make_probe(tiny_gpt, tmp_path, every=1, strict=False, quantities=["spectral_norm"])
    probe.quantities.insert(0, Exploding())
    with caplog.at_level(logging.WARNING, logger="rankguard.probe"):
        train(tiny_gpt, probe, 3)
    assert sum("boom" in r.getMessage() for r in caplog.records) == 1
    assert ("spectral_norm", "transformer.h.0.mlp.c_fc.weight") in probe.latest()
    assert all(not isinstance(q, Exploding) for q in probe.quantities)
    probe.close()


def test_failing_quantity_raises_when_strict(tiny_gpt, tmp_path, train) -> None:
    probe = make_probe(tiny_gpt, tmp_path, every=1, quantities=["spectral_norm"])
    probe.quantities.insert(0, Exploding())
    with pytest.raises(QuantityError, match="boom"):
        train(tiny_gpt, probe, 1)
    probe.close()


def test_nan_loss_is_recorded_as_nan(tiny_gpt, tmp_path, train) -> None:
    sink = MemorySink()
    probe = make_probe(tiny_gpt, tmp_path, every=2, sink=sink, quantities=["non_finite"])
    train(tiny_gpt, probe, 1)
    probe.step(torch.tensor(float("nan")))
    probe.step(float("inf"))
    probe.close()
    points = {(p.quantity, p.target, p.step): p.value for p in iter_points(sink.batches)}
    assert math.isnan(points[("loss", "global", 1)])
    assert points[("loss", "global", 2)] == math.inf
    assert points[("non_finite", "loss", 2)] == 2.0  # counts every loss since the last sample
    assert sink.batches[-1]["points"]["value"][-1] == "Infinity"


def test_step_keyword_sets_the_counter(tiny_gpt, tmp_path) -> None:
    probe = make_probe(tiny_gpt, tmp_path, every=10, quantities=["stable_rank"])
    probe.step(1.0, step=20)
    assert probe.step_count == 21
    assert probe.latest()[("loss", "global")] == 1.0
    probe.close()


def test_state_dict_round_trip(make_gpt, tmp_path, train) -> None:
    model = make_gpt()
    a = make_probe(model, tmp_path, every=2, jacobian_every=2)
    train(model, a, 3)
    state = a.state_dict()
    a.close()
    b = make_probe(model, tmp_path, every=2, jacobian_every=2)
    b.load_state_dict(state)
    assert b.step_count == 3
    again = b.state_dict()
    assert again.keys() == state.keys()
    for key in ("weights", "inputs"):
        assert again[key]["v"].keys() == state[key]["v"].keys()
        for k, v in state[key]["v"].items():
            torch.testing.assert_close(again[key]["v"][k], v)
    assert (
        again["quantities"]["jacobian_alignment"]["u"].keys()
        == state["quantities"]["jacobian_alignment"]["u"].keys()
    )
    train(model, b, 2)  # continues: step 4 is sampled with warm vectors
    assert ("stable_rank", "transformer.h.0.mlp.c_fc.weight") in b.latest()
    b.close()
    with pytest.raises(ConfigError, match="version"):
        b.load_state_dict({"version": 99})


def test_bf16_model(make_gpt, tmp_path, train) -> None:
    model = make_gpt().to(torch.bfloat16)
    probe = make_probe(model, tmp_path, every=1, jacobian_every=1)
    train(model, probe, 2)
    latest = probe.latest()
    w = model.transformer.h[0].attn.c_proj.weight.detach().float()
    s = torch.linalg.svdvals(w)
    got = latest[("spectral_norm", "transformer.h.0.attn.c_proj.weight")]
    assert got == pytest.approx(s[0].item(), rel=0.01)
    assert all(math.isfinite(v) for (q, _), v in latest.items() if q != "update_ratio")
    probe.close()


def test_conv1d_and_mha_models_run(make_gpt, tmp_path, train) -> None:
    model = make_gpt(conv1d=True)
    probe = make_probe(model, tmp_path, every=1)
    train(model, probe, 2)
    assert ("sa_sign_diversity", "transformer.h.0.attn.c_attn.weight[q]") in probe.latest()
    probe.close()

    class MHANet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(
                [nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(2)]
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = x + layer(x, x, x, need_weights=False)[0]
            return x

    net = MHANet()
    sink = MemorySink()
    probe = make_probe(net, tmp_path, every=1, sink=sink)
    for _ in range(2):
        net(torch.randn(2, 5, 8)).square().mean().backward()
        probe.step()
    latest = probe.latest()
    assert ("sa_sign_diversity", "layers.1.in_proj_weight[k]") in latest
    assert ("jacobian_alignment", "layers.0->layers.1") in latest
    probe.close()


def test_grad_norm_survives_zero_grad_before_step(tiny_gpt, tmp_path) -> None:
    probe = make_probe(tiny_gpt, tmp_path, every=1, quantities=["grad_norm"])
    idx = torch.randint(0, 32, (2, 5))
    tiny_gpt(idx).square().mean().backward()
    expected = torch.sqrt(sum(p.grad.square().sum() for p in tiny_gpt.parameters())).item()
    for p in tiny_gpt.parameters():
        p.grad = None  # zero_grad(set_to_none=True) before probe.step
    probe.step()
    assert probe.latest()[("grad_norm", "global")] == pytest.approx(expected, rel=1e-5)
    probe.close()


def test_explicit_probe_batch_and_blocks(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 6, bias=False))
    probe = make_probe(
        net,
        tmp_path,
        every=1,
        quantities=["jacobian_alignment"],
        blocks=["0", net[2]],
        probe_batch=torch.randn(1, 6),
    )
    probe.step()
    assert ("jacobian_alignment", "0->2") in probe.latest()
    probe.close()
