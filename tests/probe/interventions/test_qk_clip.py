"""QK-Clip against the model's real logits: heads at or under tau keep their weights bit for
bit, heads over it end at tau (on the same inputs), and the per-head measurement is the
model's own masked logits."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

_ROOT = Path(__file__).resolve().parents[3]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from rankguard.probe import Probe, RecoveryConfig  # noqa: E402
from rankguard.probe.attention import AttentionSite, find_attention_sites  # noqa: E402
from rankguard.probe.control import CommandRunner  # noqa: E402
from rankguard.probe.demo.model import GPT, ModelConfig  # noqa: E402
from rankguard.probe.exceptions import ConfigError  # noqa: E402
from rankguard.probe.interventions import apply_qk_clip, per_head_logit_max, qk_heads  # noqa: E402
from rankguard.probe.transport import MemoryTransport  # noqa: E402


def real_logits(model: GPT, idx: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The first block's attention logits as the model computes them (B, H, T, T), masked
    positions zeroed, and its q, k projections (B, T, C)."""
    block = model.transformer.h[0]
    captured: dict[str, Tensor] = {}
    handle = block.attn.c_attn.register_forward_hook(
        lambda m, a, out: captured.__setitem__("qkv", out.detach())
    )
    with torch.no_grad():
        model(idx)
    handle.remove()
    c = model.config.n_embd
    q, k = captured["qkv"][..., :c], captured["qkv"][..., c : 2 * c]
    b, t, _ = q.shape
    h, d = model.config.n_head, c // model.config.n_head
    qh = q.reshape(b, t, h, d).transpose(1, 2)
    kh = k.reshape(b, t, h, d).transpose(1, 2)
    att = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
    return att.masked_fill(~mask, 0.0), (q, k)


@pytest.fixture
def gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=4, n_embd=32, block_size=16, bias=True))
    with torch.no_grad():  # heads 1 and 3 with large logits, 0 and 2 small
        w = model.transformer.h[0].attn.c_attn.weight
        b = model.transformer.h[0].attn.c_attn.bias
        d = 8
        for head, gain in ((1, 40.0), (3, 25.0)):
            w[head * d : (head + 1) * d] *= gain
            w[32 + head * d : 32 + (head + 1) * d] *= gain
        b.normal_(0.0, 0.5)
    return model


def test_per_head_logits_are_the_models_masked_logits(gpt: GPT) -> None:
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    att, (q, k) = real_logits(gpt, idx)
    expected = att.abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(per_head_logit_max(q, k, 4), expected)
    # unmasked, the future positions count too: an upper bound, and here a larger one
    assert (per_head_logit_max(q, k, 4, causal=False) >= expected).all()


def test_heads_under_tau_are_untouched_and_the_others_end_at_tau(gpt: GPT) -> None:
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    att, (q, k) = real_logits(gpt, idx)
    before = att.abs().amax(dim=(0, 2, 3))
    tau = float(before.sort().values[1:3].mean())  # two heads over it, two under
    over = (before > tau).tolist()
    assert sum(over) == 2
    (site,) = find_attention_sites(gpt).sites
    heads = qk_heads(site)
    assert heads is not None
    w0 = heads.q_weight.detach().clone()
    b0 = heads.q_bias.detach().clone() if heads.q_bias is not None else None
    result = apply_qk_clip([heads], {site.name: per_head_logit_max(q, k, 4)}, tau)
    assert result.clipped == {site.name: [i for i, o in enumerate(over) if o]}
    after = real_logits(gpt, idx)[0].abs().amax(dim=(0, 2, 3))
    d, c = 8, 32
    for h in range(4):
        rows_q = slice(h * d, (h + 1) * d)
        rows_k = slice(c + h * d, c + (h + 1) * d)
        if over[h]:
            assert after[h].item() == pytest.approx(tau, rel=1e-5)
        else:
            assert torch.equal(heads.q_weight[rows_q], w0[rows_q])
            assert torch.equal(heads.q_weight[rows_k], w0[rows_k])
            assert b0 is not None and heads.q_bias is not None
            assert torch.equal(heads.q_bias[rows_q], b0[rows_q])
            assert after[h] == before[h]
    # V is never touched
    assert torch.equal(heads.q_weight[2 * c :], w0[2 * c :])


def test_grouped_query_heads_rescale_only_the_query() -> None:
    torch.manual_seed(0)
    q_proj, k_proj = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 8, bias=False)
    module = torch.nn.Module()
    module.q_proj, module.k_proj = q_proj, k_proj
    site = AttentionSite("attn", module, False, n_head=4, n_kv_head=2, q=q_proj, k=k_proj)
    heads = qk_heads(site)
    assert heads is not None and heads.n_kv_head == 2 and heads.head_dim == 4
    x = torch.randn(2, 5, 16)
    q, k = q_proj(x).detach(), k_proj(x).detach()
    before = per_head_logit_max(q, k, 4, 2)
    tau = float(before.min()) * 0.5  # every head over it
    k0 = k_proj.weight.detach().clone()
    apply_qk_clip([heads], {"attn": before}, tau)
    assert torch.equal(k_proj.weight, k0)
    after = per_head_logit_max(q_proj(x).detach(), k_proj(x).detach(), 4, 2)
    torch.testing.assert_close(after, torch.full((4,), tau), rtol=1e-5, atol=0.0)


def test_the_command_acks_what_it_clipped_and_refuses_without_logits(gpt: GPT) -> None:
    (site,) = find_attention_sites(gpt).sites
    heads = qk_heads(site)
    assert heads is not None
    runner = CommandRunner(targets=[], reconfigure=lambda c: {}, qk_heads=[heads])
    before = heads.q_weight.detach().clone()
    missing = runner.apply({"id": "a", "kind": "qk_clip", "args": {"tau": 10}}, 3)
    assert missing["state"] == "failed" and "no attention logits" in missing["error"]
    ack = runner.apply(
        {
            "id": "b",
            "kind": "qk_clip",
            "args": {"tau": 10, "logit_max": {site.name: [1, 50, 2, 20]}},
        },
        3,
    )
    assert ack["state"] == "applied"
    assert ack["result"]["clipped"] == {site.name: [1, 3]}
    # a clip is undone like any rewrite, bit-identically
    clipped = heads.q_weight.detach().clone()
    assert not torch.equal(clipped, before)
    assert runner.apply({"id": "u", "kind": "undo"}, 4)["state"] == "applied"
    assert torch.equal(heads.q_weight.detach(), before)
    bad = runner.apply({"id": "c", "kind": "qk_clip", "args": {"tau": -1}}, 3)
    assert bad["state"] == "failed" and "args.tau" in bad["error"]
    with pytest.raises(ConfigError, match="per-head"):
        apply_qk_clip([heads], {site.name: torch.ones(3)}, 1.0)


def test_the_probe_clips_from_the_logits_it_measures(gpt: GPT, tmp_path) -> None:
    """In-process QK-Clip takes the per-head logits the attention quantity reads where the
    model computes them; afterwards the model's real logits are at tau or under it."""
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    before = real_logits(gpt, idx)[0].abs().amax(dim=(0, 2, 3))
    tau = float(before.sort().values[1:3].mean())
    over = (before > tau).tolist()
    untouched = gpt.transformer.h[0].attn.c_attn.weight.detach().clone()
    opt = torch.optim.SGD(gpt.parameters(), lr=0.0)  # the weights move by QK-Clip only
    transport = MemoryTransport()
    probe = Probe(
        gpt,
        opt,
        run="qk-clip",
        every=1,
        transport=transport,
        log_dir=tmp_path,
        quantities=["attention_logit_max"],
        max_sequences=2,
        recovery=RecoveryConfig(qk_clip_tau=tau, rollback=False),
    )
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(gpt(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.step(loss)
    probe.close()
    events = [e for b in transport.batches for e in b.get("events", []) if e["kind"] == "qk_clip"]
    assert events and events[0]["payload"]["clipped"] == {
        "transformer.h.0.attn": [h for h, o in enumerate(over) if o]
    }
    after = real_logits(gpt, idx)[0].abs().amax(dim=(0, 2, 3))
    assert (after <= tau * (1 + 1e-4)).all()
    weight = gpt.transformer.h[0].attn.c_attn.weight
    for h in (h for h, o in enumerate(over) if not o):
        assert torch.equal(weight[h * 8 : (h + 1) * 8], untouched[h * 8 : (h + 1) * 8])
