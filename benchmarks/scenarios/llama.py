"""The second architecture of the scenario catalog: a Llama-style decoder from Hugging Face
``transformers`` (``LlamaForCausalLM``: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention)
built from a tiny random config, nothing downloaded. Its parameters keep HF's names
(``model.layers.{i}.self_attn.q_proj.weight``...), as a user's model would.

``LlamaSpec`` is the frozen, hashable description a scenario carries (as ``ModelConfig`` is
for the GPT); :func:`build` makes the model. The KV cache is off: training needs none, and the
probe's Jacobian forwards must not see stale keys. Vocabulary: the corpus's 256 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

AttnImpl = Literal["eager", "sdpa"]


@dataclass(frozen=True)
class LlamaSpec:
    arch: ClassVar[str] = "llama"  # what a scenario's model spec reports (``Scenario.arch``)
    vocab_size: int = 256
    block_size: int = 64  # max_position_embeddings: the longest sequence trained on
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: 2 query heads share each key/value head
    n_embd: int = 64
    intermediate: int = 172  # SwiGLU width, ~8/3 x n_embd as Llama's
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = False
    attn_impl: AttnImpl = "sdpa"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}, and n_head by "
                f"n_kv_head={self.n_kv_head}"
            )
        if self.attn_impl not in ("eager", "sdpa"):
            raise ValueError(f"attn_impl must be 'eager' or 'sdpa', got {self.attn_impl!r}")

    def build(self) -> nn.Module:
        return build(self)


def build(spec: LlamaSpec) -> nn.Module:
    """A randomly initialised model (seed it with ``torch.manual_seed`` first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config: Any = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.n_embd,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head,
        num_key_value_heads=spec.n_kv_head,
        max_position_embeddings=spec.block_size,
        rope_theta=spec.rope_theta,
        initializer_range=spec.init_std,
        tie_word_embeddings=spec.tie_embeddings,
        use_cache=False,
        attn_implementation=spec.attn_impl,
    )
    return LlamaForCausalLM(config)  # type: ignore[no-any-return]
