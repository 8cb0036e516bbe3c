from __future__ import annotations

import pytest
import torch
from torch import nn

from rankguard.probe.exceptions import ConfigError, SelectorError
from rankguard.probe.targets import find_blocks, find_targets, select


def names(targets: list) -> list[str]:
    return [t.name for t in targets]


def test_nanogpt_fused_qkv_split_in_thirds(tiny_gpt: nn.Module) -> None:
    targets = {t.name: t for t in find_targets(tiny_gpt)}
    w = tiny_gpt.transformer.h[0].attn.c_attn.weight  # (3d, d)
    d = w.shape[1]
    for i, part in enumerate("qkv"):
        t = targets[f"transformer.h.0.attn.c_attn.weight[{part}]"]
        assert t.groups == {"attention"}
        torch.testing.assert_close(t.matrix(), w.detach()[i * d : (i + 1) * d])
    assert targets["transformer.h.0.attn.c_proj.weight"].groups == {"attention"}
    assert targets["transformer.h.0.mlp.c_fc.weight"].groups == {"mlp"}
    assert targets["transformer.h.0.mlp.c_proj.weight"].groups == {"mlp"}
    # tied embedding / head excluded by default
    assert "transformer.wte.weight" not in targets
    assert len(targets) == 2 * 6


def test_matrix_is_a_writable_view(tiny_gpt: nn.Module) -> None:
    t = next(t for t in find_targets(tiny_gpt) if t.name.endswith("c_attn.weight[k]"))
    new = torch.full(t.shape, 3.0)
    with torch.no_grad():
        t.matrix().copy_(new)
    w = tiny_gpt.transformer.h[0].attn.c_attn.weight.detach()
    d = w.shape[1]
    assert torch.equal(w[d : 2 * d], new)
    assert not torch.equal(w[:d], new[:d])  # the [q] part is untouched


def test_hf_conv1d_is_transposed(make_gpt) -> None:
    model = make_gpt(conv1d=True)
    targets = {t.name: t for t in find_targets(model)}
    conv = model.transformer.h[0].attn.c_attn  # weight (nx=d, nf=3d)
    d = conv.weight.shape[0]
    q = targets["transformer.h.0.attn.c_attn.weight[q]"]
    assert q.transposed and q.shape == (d, d)
    torch.testing.assert_close(q.matrix(), conv.weight.detach().t()[:d])
    x = torch.randn(5, d)
    # the (out, in) convention: y[:, :d] = x @ W[:, :d] = x @ matrix()ᵀ
    torch.testing.assert_close(conv(x)[:, :d], x @ q.matrix().t() + conv.bias.detach()[:d])
    proj = targets["transformer.h.0.attn.c_proj.weight"]
    assert proj.transposed and "attention" in proj.groups
    with torch.no_grad():
        q.matrix().copy_(torch.zeros(d, d))
    assert torch.equal(conv.weight.detach()[:, :d], torch.zeros(d, d))


def test_multihead_attention_split() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2))
    targets = {t.name: t for t in find_targets(model)}
    assert set(targets) == {
        f"{i}.{n}"
        for i in (0, 1)
        for n in ("in_proj_weight[q]", "in_proj_weight[k]", "in_proj_weight[v]", "out_proj.weight")
    }
    w = model[0].in_proj_weight.detach()
    torch.testing.assert_close(targets["0.in_proj_weight[v]"].matrix(), w[16:24])
    assert all(t.groups == {"attention"} for t in targets.values())


def test_separate_projections_are_attention() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(4, 4), nn.Linear(4, 4)
            self.v_proj, self.o_proj = nn.Linear(4, 4), nn.Linear(4, 4)
            self.up = nn.Linear(4, 8)

    model = nn.ModuleList([Attn(), Attn()])
    groups = {t.name: t.groups for t in find_targets(model)}
    assert groups["0.q_proj.weight"] == {"attention"}
    assert groups["1.o_proj.weight"] == {"attention"}
    assert groups["0.up.weight"] == {"mlp"}


def test_embeddings_and_head_on_request(tiny_gpt: nn.Module) -> None:
    with_head = find_targets(tiny_gpt, head=True)
    tied = [t for t in with_head if t.name == "transformer.wte.weight"]
    assert len(tied) == 1 and tied[0].groups == {"embedding", "head"}
    assert "transformer.wte.weight" in names(find_targets(tiny_gpt, embeddings=True))

    class Untied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.lm_head = nn.Linear(4, 10)

    m = Untied()
    assert names(find_targets(m)) == ["blocks.0.weight", "blocks.1.weight"]
    assert "lm_head.weight" in names(find_targets(m, head=True))
    assert "emb.weight" in names(find_targets(m, embeddings=True))


def test_include_exclude_and_errors(tiny_gpt: nn.Module) -> None:
    only = find_targets(tiny_gpt, include=["*.mlp.*"])
    assert names(only) and all(".mlp." in n for n in names(only))
    # a glob naming the parameter selects all its fused parts
    parts = find_targets(tiny_gpt, include="transformer.h.0.attn.c_attn.weight")
    assert [n[-3:] for n in names(parts)] == ["[q]", "[k]", "[v]"]
    rest = find_targets(tiny_gpt, exclude=["*attn*"])
    assert not any("attn" in n for n in names(rest))
    with pytest.raises(ConfigError, match=r"include.*\*nothing\*"):
        find_targets(tiny_gpt, include=["*nothing*"])
    with pytest.raises(ValueError, match="lm_head"):
        find_targets(tiny_gpt, include=["lm_head*"])  # the head is excluded unless head=True


def test_user_attention_groups_override(tiny_gpt: nn.Module) -> None:
    targets = find_targets(tiny_gpt, attention=["*.mlp.c_fc.weight"])
    att = [t.name for t in targets if "attention" in t.groups]
    assert att == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"]
    assert all("mlp" in t.groups for t in targets if "c_attn" in t.name)
    with pytest.raises(ConfigError, match="attention"):
        find_targets(tiny_gpt, attention=["*nope*"])


def test_select(tiny_gpt: nn.Module) -> None:
    targets = find_targets(tiny_gpt)
    att = select(targets, "attention")
    assert len(att) == 8 and all("attention" in t.groups for t in att)
    assert select(targets, "all_2d") == targets
    assert names(select(targets, ["*.c_fc.weight"])) == [
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_fc.weight",
    ]
    with pytest.raises(SelectorError, match="'mlp_only'"):
        select(targets, "mlp_only")
    with pytest.raises(ValueError, match=r"\*missing\*"):
        select(targets, ["*.c_fc.weight", "*missing*"])
    mlp_only = [t for t in targets if "mlp" in t.groups]
    with pytest.raises(SelectorError, match="attention"):
        select(mlp_only, "attention")


def test_find_blocks(tiny_gpt: nn.Module) -> None:
    assert [n for n, _ in find_blocks(tiny_gpt)] == ["transformer.h.0", "transformer.h.1"]
    seq = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    assert [n for n, _ in find_blocks(seq)] == ["0", "1", "2"]
    assert find_blocks(nn.Linear(3, 3)) == []
