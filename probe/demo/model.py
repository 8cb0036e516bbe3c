"""A small nanoGPT-style GPT with the knobs the instability scenarios need.

Layout follows nanoGPT so probes find the usual names: ``transformer.wte``, ``transformer.wpe``,
``transformer.h[i].attn.c_attn`` (fused QKV, (3C, C)), ``.attn.c_proj``, ``.mlp.c_fc``,
``.mlp.c_proj``, ``transformer.ln_f``, ``lm_head``. The attention module carries ``n_head``.

Knobs: pre-LN or post-LN, per-head qk-LayerNorm, tied embeddings, biases, init scale and
µP-style multipliers (hidden 2-D init ×m, W_Q = 0, output projections ÷√(2L)), and attention
either with explicit matmuls (so attention logits can be read and forward-mode AD works) or
SDPA. The explicit path can compute the logits q·kᵀ in bf16/fp16, the low-precision failure
mode.

The cost benchmarks (probe_overhead, server_down, msign_cost) and examples/quickstart.py
time this model too, as ``ModelConfig(bias=True, attn_impl="sdpa", ...)`` (nanoGPT's own
layout) on the toy task of :func:`random_batch`, with :func:`next_token_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

NormPosition = Literal["pre", "post"]
AttnImpl = Literal["explicit", "sdpa"]
LogitDtype = Literal["float32", "bfloat16", "float16"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    norm_position: NormPosition = "pre"
    qk_norm: bool = False
    tie_embeddings: bool = True
    bias: bool = False
    init_std: float = 0.02
    # µP-ish knobs (MSign footnotes 1–2): hidden 2-D weights start at init_std × hidden_init_mult,
    # W_Q starts at zero, c_proj weights are further divided by √(2·n_layer).
    hidden_init_mult: float = 1.0
    zero_query_init: bool = False
    scale_residual_init: bool = True
    attn_impl: AttnImpl = "explicit"
    attn_logit_dtype: LogitDtype = "float32"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        if self.attn_impl not in ("explicit", "sdpa"):
            raise ValueError(f"attn_impl must be 'explicit' or 'sdpa', got {self.attn_impl!r}")
        if self.attn_logit_dtype not in _DTYPES:
            raise ValueError(
                f"attn_logit_dtype must be one of {sorted(_DTYPES)}, got {self.attn_logit_dtype!r}"
            )
        if self.attn_impl == "sdpa" and self.attn_logit_dtype != "float32":
            raise ValueError("attn_logit_dtype other than float32 needs attn_impl='explicit'")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class CausalSelfAttention(nn.Module):
    causal_mask: torch.Tensor  # (1, 1, block_size, block_size) bool buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            # Per-head LayerNorm on q and k (Wortsman et al. §2.1, ε = 1e-6).
            self.q_ln = nn.LayerNorm(self.head_dim, eps=1e-6, bias=cfg.bias)
            self.k_ln = nn.LayerNorm(self.head_dim, eps=1e-6, bias=cfg.bias)
        self.attn_impl = cfg.attn_impl
        self.logit_dtype = _DTYPES[cfg.attn_logit_dtype]
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", mask.view(1, 1, cfg.block_size, cfg.block_size))
        # max |q·k|/√d_h of the latest forward (explicit path only), a detached 0-d tensor.
        self.last_logit_max: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q = self.q_ln(q)
            k = self.k_ln(k)
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scale = 1.0 / math.sqrt(self.head_dim)
            if self.logit_dtype != torch.float32:
                # Emulates a low-precision GEMM (tensor cores): q and k rounded to bf16/fp16,
                # products accumulated in fp32, the output q·kᵀ rounded to bf16/fp16 (fp16
                # overflows to inf above 65504), then scaled; softmax stays fp32. CPU half
                # matmuls are slow, so the rounding is done by casts around an fp32 matmul.
                lp = self.logit_dtype
                qk = q.to(lp).float() @ k.to(lp).float().transpose(-2, -1)  # (B, H, T, T)
                att = qk.to(lp).float() * scale
            else:
                att = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
            mask = self.causal_mask[:, :, :t, :t]
            with torch.no_grad():
                self.last_logit_max = att.detach().masked_fill(~mask, 0.0).abs().amax()
            att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        out: torch.Tensor = self.c_proj(y)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.c_proj(self.gelu(self.c_fc(x)))
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.norm_position == "pre"
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor
        if self.pre_ln:
            x = x + self.attn(self.ln_1(x))
            out = x + self.mlp(self.ln_2(x))
            return out
        # Post-LN (original Transformer): normalise after each residual sum.
        x = self.ln_1(x + self.attn(x))
        out = self.ln_2(x + self.mlp(x))
        return out


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.n_embd),
                "wpe": nn.Embedding(cfg.block_size, cfg.n_embd),
                "h": nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                # Post-LN blocks already end in a norm; ln_f is kept for a uniform layout.
                "ln_f": nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            }
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = cast(nn.Embedding, self.transformer["wte"]).weight
        self._init_weights()

    @property
    def blocks(self) -> list[Block]:
        """The repeated blocks (``transformer.h``)."""
        return [cast(Block, b) for b in cast(nn.ModuleList, self.transformer["h"])]

    def _init_weights(self) -> None:
        cfg = self.config
        hidden_std = cfg.init_std * cfg.hidden_init_mult
        for name, p in self.named_parameters():
            if p.ndim < 2:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                continue  # LayerNorm weights keep their ones
            if name.startswith("transformer.h."):
                std = hidden_std
                if cfg.scale_residual_init and name.endswith("c_proj.weight"):
                    std = hidden_std / math.sqrt(2 * cfg.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                nn.init.normal_(p, mean=0.0, std=cfg.init_std)
        if cfg.zero_query_init:
            for block in self.blocks:
                with torch.no_grad():
                    block.attn.c_attn.weight[: cfg.n_embd].zero_()  # rows of W_Q

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids ``idx`` (B, T)."""
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size={self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.transformer["wte"](idx) + self.transformer["wpe"](pos)[None]
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.transformer["ln_f"](x))
        return logits

    def attention_logit_max(self) -> list[float]:
        """Per block, max |q·k|/√d_h from the latest forward (NaN where not recorded)."""
        out: list[float] = []
        for block in self.blocks:
            v = block.attn.last_logit_max
            out.append(float("nan") if v is None else float(v))
        return out


def next_token_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's logits on ``idx`` (B, T) against ``targets`` (B, T)."""
    logits = model(idx)  # (B, T, V)
    loss: torch.Tensor = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return loss


def random_batch(
    cfg: ModelConfig,
    batch_size: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy task for the cost benchmarks: the next token is (previous token + 1)
    mod vocab, with a random start per sequence. Returns inputs and targets, each (B, T)."""
    start = torch.randint(0, cfg.vocab_size, (batch_size, 1), generator=generator)
    seq = (start + torch.arange(cfg.block_size + 1)) % cfg.vocab_size
    seq = seq.to(device)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
