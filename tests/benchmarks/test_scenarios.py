"""Fast checks of the instability scenarios: data, model, failure definition, catalog, loop."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwad

# benchmarks/ lives at the repo root and is not an installed package; make it importable
# whatever directory pytest was started from.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.scenarios import catalog  # noqa: E402
from rankguard.probe.demo.data import ByteCorpus, corpus_bytes  # noqa: E402
from rankguard.probe.demo.failure import (  # noqa: E402
    FailureKind,
    classify,
    find_explosion,
    smoothed_final_loss,
)
from rankguard.probe.demo.model import GPT, ModelConfig  # noqa: E402
from rankguard.probe.demo.train import QKRowLR, build_optimizer, train  # noqa: E402

SMALL_BYTES = 200_000


@pytest.fixture(scope="module")
def corpus() -> ByteCorpus:
    return ByteCorpus.load(max_bytes=SMALL_BYTES)


# --- data -----------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_sized() -> None:
    a = corpus_bytes(SMALL_BYTES)
    corpus_bytes.cache_clear()
    b = corpus_bytes(SMALL_BYTES)
    assert a == b
    assert len(a) == SMALL_BYTES
    assert b"def " in a  # it is Python source


def test_split_and_batches_are_deterministic(corpus: ByteCorpus) -> None:
    assert len(corpus.train) + len(corpus.val) == SMALL_BYTES
    assert len(corpus.val) == pytest.approx(0.1 * SMALL_BYTES, abs=1)
    x1, y1 = corpus.batch("train", 4, 32, torch.Generator().manual_seed(3))
    x2, y2 = corpus.batch("train", 4, 32, torch.Generator().manual_seed(3))
    x3, _ = corpus.batch("train", 4, 32, torch.Generator().manual_seed(4))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (4, 32) and x1.dtype == torch.int64
    # y is x shifted by one byte
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert int(x1.max()) < 256


def test_batch_rejects_bad_split(corpus: ByteCorpus) -> None:
    with pytest.raises(ValueError, match="split"):
        corpus.batch("test", 2, 8, torch.Generator())


# --- model ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_position": "post"},
        {"qk_norm": True},
        {"tie_embeddings": False, "zero_query_init": True, "hidden_init_mult": 4.0},
        {"attn_logit_dtype": "bfloat16"},
        {"attn_impl": "sdpa"},
    ],
)
def test_model_forward_backward(overrides: dict[str, object]) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, **overrides)  # type: ignore[arg-type]
    model = GPT(cfg)
    idx = torch.randint(0, 256, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 256)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # nanoGPT names the probes rely on
    attn = model.transformer.h[0].attn
    assert attn.n_head == 4
    assert attn.c_attn.weight.shape == (96, 32)
    assert model.transformer.h[1].mlp.c_fc.weight.shape == (128, 32)
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.transformer.wte.weight


def test_model_is_causal() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8))
    idx = torch.randint(0, 256, (1, 8))
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % 256
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_explicit_attention_matches_sdpa_and_records_logits() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16)
    explicit = GPT(cfg)
    sdpa = GPT(replace(cfg, attn_impl="sdpa"))
    sdpa.load_state_dict(explicit.state_dict())
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(explicit(idx), sdpa(idx), rtol=1e-5, atol=1e-5)
    # the recorded logit max equals max |q·k|/√d over the causal triangle of block 0
    attn = explicit.transformer.h[0].attn
    with torch.no_grad():
        x = explicit.transformer.wte(idx) + explicit.transformer.wpe(torch.arange(16))[None]
        q, k, _ = attn.c_attn(explicit.transformer.h[0].ln_1(x)).split(32, dim=2)
        q = q.view(2, 16, 4, 8).transpose(1, 2)  # (B, H, T, D)
        k = k.view(2, 16, 4, 8).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(8)
        ref = logits.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), 0).abs().max()
    torch.testing.assert_close(explicit.attention_logit_max()[0], float(ref))


# torch's forward-AD decompositions call torch.jit.script on first use (a torch-internal warning).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_explicit_attention_supports_forward_mode_ad() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    block = model.transformer.h[0]
    x = torch.randn(1, 8, 16)
    v = torch.randn_like(x)
    with fwad.dual_level():
        jvp = fwad.unpack_dual(block(fwad.make_dual(x, v))).tangent
    eps = 1e-3
    fd = (block(x + eps * v) - block(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(jvp, fd, rtol=1e-2, atol=1e-3)


def test_model_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="norm_position"):
        ModelConfig(norm_position="middle")  # type: ignore[arg-type]


def test_mup_init_zeroes_queries_and_scales_hidden() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_embd=64, hidden_init_mult=4.0, zero_query_init=True)
    model = GPT(cfg)
    w = model.transformer.h[0].attn.c_attn.weight.detach()
    assert float(w[:64].abs().max()) == 0.0
    assert float(w[64:].std()) == pytest.approx(0.08, rel=0.1)
    proj = model.transformer.h[0].mlp.c_proj.weight.detach()
    assert float(proj.std()) == pytest.approx(0.08 / math.sqrt(8), rel=0.1)


# --- failure definition ---------------------------------------------------------------------


def _decay(n: int, start: float = 5.0, floor: float = 2.0) -> list[float]:
    return [floor + (start - floor) * math.exp(-i / 30) for i in range(n)]


def test_healthy_curve_has_no_failure() -> None:
    losses = _decay(300)
    assert find_explosion(losses) is None
    assert classify(losses, control_losses=losses) is None


def test_spike_above_twice_running_min_is_explosion_at_that_step() -> None:
    losses = _decay(300)
    losses[200] = 2.05 * min(losses[:200])
    fail = find_explosion(losses)
    assert fail is not None and fail.kind is FailureKind.EXPLOSION
    assert fail.step == 200
    assert fail.reference == pytest.approx(min(losses[:200]))
    # just under 2x is not an explosion
    losses[200] = 1.95 * min(losses[:200])
    assert find_explosion(losses) is None


def test_non_finite_loss_is_explosion() -> None:
    losses = [*_decay(120), float("nan")]
    fail = classify(losses)
    assert fail is not None and fail.kind is FailureKind.EXPLOSION and fail.step == 120
    inf_fail = find_explosion([*_decay(80), float("inf")])
    assert inf_fail is not None and inf_fail.step == 80


def test_warmup_is_not_judged_but_nan_in_warmup_still_fails() -> None:
    # a high first loss followed by an early bump inside warmup is not an explosion
    losses = [5.5, 2.0, 4.5, *_decay(100, start=3.0)]
    assert find_explosion(losses, warmup=50) is None
    assert find_explosion(losses, warmup=0) is not None
    dead = [5.0, float("nan")]
    fail = classify(dead, warmup=50)
    assert fail is not None and fail.kind is FailureKind.EXPLOSION


def test_silent_degradation_against_the_control() -> None:
    control = _decay(300, floor=2.0)
    stalled = _decay(300, floor=2.0 * 1.3)
    fail = classify(stalled, control_losses=control)
    assert fail is not None and fail.kind is FailureKind.SILENT_DEGRADATION
    assert fail.value == pytest.approx(smoothed_final_loss(stalled))
    slightly_worse = _decay(300, floor=2.0 * 1.05)
    assert classify(slightly_worse, control_losses=control) is None
    # without a control only explosions count
    assert classify(stalled) is None


def test_failure_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="factor"):
        find_explosion([1.0], factor=1.0)
    with pytest.raises(ValueError, match="losses is empty"):
        smoothed_final_loss([])


# --- catalog and training loop --------------------------------------------------------------


def test_catalog_has_required_scenarios() -> None:
    failing = catalog.failing()
    healthy = catalog.healthy()
    assert len(failing) >= 3 and len(healthy) >= 3
    assert len({s.mechanism for s in failing}) == len(failing)
    assert any(s.expected is FailureKind.EXPLOSION for s in failing)
    assert any(s.schedule.spike_start is not None for s in failing)
    for s in failing:
        control = catalog.get(s.control or "")
        assert control.role == "healthy"
        assert control.model.n_embd == s.model.n_embd and control.model.n_layer == s.model.n_layer
        assert control.seeds == s.seeds and control.steps == s.steps


@pytest.mark.parametrize("name", sorted(catalog.SCENARIOS))
def test_each_scenario_constructs_and_steps(name: str, corpus: ByteCorpus) -> None:
    scenario = catalog.get(name)
    model = GPT(scenario.model)
    optimizer = build_optimizer(model, scenario)
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())
    result = train(scenario, scenario.seeds[0], corpus=corpus, max_steps=2, evaluate_at_end=False)
    assert result.steps_run == 2 and len(result.losses) == 2
    assert all(math.isfinite(v) for v in result.losses)


def test_unknown_scenario_is_named() -> None:
    with pytest.raises(KeyError, match="no-such"):
        catalog.get("no-such")


def test_qk_row_lr_matches_a_separate_param_group() -> None:
    # the W_Q/W_K rows of a fused c_attn step as if their own AdamW group had mult x the LR
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8))
    w = model.transformer.h[0].attn.c_attn.weight
    c, mult, lr, wd = 8, 30.0, 1e-3, 0.1
    qk_ref = torch.nn.Parameter(w.detach()[: 2 * c].clone())
    v_ref = torch.nn.Parameter(w.detach()[2 * c :].clone())
    ref = torch.optim.AdamW(
        [{"params": [qk_ref], "lr": lr * mult}, {"params": [v_ref], "lr": lr}], weight_decay=wd
    )
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=wd)
    rows = QKRowLR(model, mult)
    for _ in range(5):
        g = torch.randn_like(w)
        w.grad, qk_ref.grad, v_ref.grad = g.clone(), g[: 2 * c].clone(), g[2 * c :].clone()
        rows.snapshot()
        opt.step()
        rows.rescale()
        ref.step()
    torch.testing.assert_close(w.detach()[: 2 * c], qk_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.detach()[2 * c :], v_ref.detach(), rtol=0, atol=0)


def test_schedule_spike_and_warmup() -> None:
    sched = catalog.Schedule(warmup_steps=10, spike_start=50, spike_len=5, spike_factor=30.0)
    assert sched.multiplier(0, 100) == pytest.approx(0.1)
    assert sched.multiplier(20, 100) == pytest.approx(1.0)
    assert sched.multiplier(50, 100) == pytest.approx(30.0)
    assert sched.multiplier(55, 100) == pytest.approx(1.0)
    ramp = catalog.Schedule(warmup_steps=0, ramp_to=10.0)
    assert ramp.multiplier(100, 100) == pytest.approx(10.0)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.weights_after: list[torch.Tensor] = []

    def on_before_step(self, step: int, model: GPT, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append(("before", step))

    def on_step(
        self, step: int, model: GPT, optimizer: torch.optim.Optimizer, loss: torch.Tensor
    ) -> None:
        self.calls.append(("after", step))
        self.weights_after.append(model.transformer.h[0].attn.c_attn.weight.detach().clone())


def test_train_is_deterministic_and_calls_hooks(corpus: ByteCorpus) -> None:
    scenario = catalog.Scenario(
        name="tiny",
        role="healthy",
        mechanism="test",
        model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16),
        optim=catalog.OptimConfig(lr=1e-3),
        schedule=catalog.Schedule(warmup_steps=2),
        steps=4,
        batch_size=2,
        seq_len=16,
    )
    rec = _Recorder()
    a = train(scenario, 0, corpus=corpus, callbacks=[rec])
    b = train(scenario, 0, corpus=corpus)
    assert a.losses == b.losses and a.grad_norms == b.grad_norms
    assert rec.calls == [(k, s) for s in range(4) for k in ("before", "after")]
    # on_step sees the weights after optimizer.step(): consecutive snapshots differ
    assert not torch.equal(rec.weights_after[0], rec.weights_after[1])
    assert len(a.attn_logit_max) == 4 and all(v > 0 for v in a.attn_logit_max)
    assert math.isfinite(a.val_loss)
