"""The model matrix: tiny random configs of the models people train (nothing downloaded).

Each entry builds a model with dropout off (so a sampled step's forward and the probe's
eval-mode replays see the same function), a batch, and its loss. ``attention`` names what a
reference must see: the module class whose call computes attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.models import TinyGPT

VOCAB, SEQ, BATCH, D, HEADS = 64, 8, 2, 32, 4


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict[str, Tensor]]
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    hf: bool = True  # a transformers model (attention through its interface)


def _ids(g: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def _pixels(g: torch.Generator) -> dict[str, Tensor]:
    return {
        "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g),
        "labels": torch.randint(0, 3, (BATCH,), generator=g),
    }


def _hf_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    loss: Tensor = model(**batch).loss
    return loss


def _decoder(kind: str, **extra: Any) -> nn.Module:
    import transformers as tf

    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
    }[kind]
    config = config_cls(
        hidden_size=D,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        num_key_value_heads=2,  # grouped-query attention
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_dropout=0.0,
        **extra,
    )
    model: nn.Module = model_cls(config)
    return model


def gpt2() -> nn.Module:
    import transformers as tf

    config = tf.GPT2Config(
        n_embd=D,
        n_layer=3,
        n_head=HEADS,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model: nn.Module = tf.GPT2LMHeadModel(config)
    return model


def bert() -> nn.Module:
    import transformers as tf

    config = tf.BertConfig(
        hidden_size=D,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        intermediate_size=64,
        vocab_size=VOCAB,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model: nn.Module = tf.BertForMaskedLM(config)
    return model


def vit() -> nn.Module:
    import transformers as tf

    config = tf.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        num_labels=3,
        hidden_size=D,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model: nn.Module = tf.ViTForImageClassification(config)
    return model


class HandAttention(nn.Module):
    """Attention written out by hand, with names no heuristic knows: ``q``, ``k``, ``v``,
    ``o`` and a head count ``h``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.h = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            m(x).view(b, t, self.h, c // self.h).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.h)  # (b, h, t, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, c))


class HandBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm_a, self.norm_b = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix = HandAttention(d, heads)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mix(self.norm_a(x))
        return x + self.down(F.silu(self.up(self.norm_b(x))))


class HandModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.stack = nn.ModuleList(HandBlock(D, HEADS) for _ in range(3))
        self.out = nn.Linear(D, VOCAB)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
        x = self.embed(input_ids)
        for block in self.stack:
            x = block(x)
        return self.out(x)


def _lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(batch["input_ids"])
    ids = batch["input_ids"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class NanoGPT(TinyGPT):
    """The nanoGPT layout (fused ``c_attn``, SDPA), called like the others."""

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(input_ids)


def nanogpt() -> nn.Module:
    return NanoGPT(vocab=VOCAB, d=D, n_layer=3, n_head=HEADS)


ENTRIES = {
    e.name: e
    for e in [
        Entry("gpt2", gpt2, _ids, _hf_loss),
        Entry("llama", lambda: _decoder("llama"), _ids, _hf_loss),
        Entry("qwen2", lambda: _decoder("qwen2"), _ids, _hf_loss),
        Entry("qwen3", lambda: _decoder("qwen3", head_dim=8), _ids, _hf_loss),  # qk-norm
        Entry("mistral", lambda: _decoder("mistral", sliding_window=4), _ids, _hf_loss),
        Entry(
            "mixtral",
            lambda: _decoder("mixtral", num_local_experts=4, num_experts_per_tok=2),
            _ids,
            _hf_loss,
        ),
        Entry("bert", bert, _ids, _hf_loss),
        Entry("vit", vit, _pixels, _hf_loss),
        Entry("nanogpt", nanogpt, _ids, _lm_loss, hf=False),
        Entry("handwritten", HandModel, _ids, _lm_loss, hf=False),
    ]
}
