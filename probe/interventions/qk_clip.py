"""QK-Clip (Kimi K2's MuonClip rule): rescale one head's query and key weights when that
head's largest attention logit exceeds ``tau``.

For head h with max logit S_h = max_ij |q_i . k_j| / sqrt(d_h) over a batch, and S_h > tau:
gamma_h = tau / S_h, and the head's rows of W_q and W_k (and their biases) are multiplied by
sqrt(gamma_h) each, so that every logit of that head, on the same inputs, is multiplied by
gamma_h: the largest becomes tau. Heads at or under tau are multiplied by exactly 1.0 (their
weights stay bit-identical). With grouped-query attention a key head serves several query
heads, so only the query rows are rescaled, by gamma_h (the key head is left alone).
Kimi K2 uses tau = 100 and applies it after every optimizer step (peers-2026-12.md §1a).

The interface is small on purpose (any attention implementation can provide it):

- :class:`QKHeads`: where a site's per-head query and key rows live (:func:`qk_heads` builds
  it from a probe attention site: a fused ``c_attn``/``qkv`` projection or separate q/k
  projections);
- per-head max logits: a (n_head,) tensor per site. The probe takes them from the
  ``attention_logit_max`` quantity (``AttentionLogitMax.per_head``: the logits as the model
  computes them, after rotary embeddings, masked); where a site is only reachable by its
  projections, :func:`per_head_logit_max` computes them from the captured q and k (before
  any rotary embedding: for a model with one, an approximation).

Exact for the layer's own logits given its inputs; a clip in an earlier layer changes the
inputs of the later ones (as it does in Kimi K2, where the rule runs every step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import AttentionSite
from ..exceptions import ConfigError
from ..quantities.sharded import is_dtensor

__all__ = ["QKClipResult", "QKHeads", "apply_qk_clip", "per_head_logit_max", "qk_heads"]

_CHUNK = 256  # query rows per block: bounds the (b, h, chunk, T) logits buffer


@dataclass(frozen=True)
class QKHeads:
    """One attention site's query/key rows, per head.

    ``q_weight``/``k_weight`` are (out, in) parameters (the same fused parameter for a fused
    projection); head h's query rows are ``q_offset + h*head_dim ...`` and key head g's rows
    ``k_offset + g*head_dim ...``; biases (if any) follow the same rows.
    """

    site: str
    n_head: int
    n_kv_head: int
    head_dim: int
    q_weight: nn.Parameter
    k_weight: nn.Parameter
    q_offset: int = 0
    k_offset: int = 0
    q_bias: nn.Parameter | None = None
    k_bias: nn.Parameter | None = None


def qk_heads(site: AttentionSite) -> QKHeads | None:
    """The per-head rows of a probe attention site, or None when they cannot be told apart
    (no head count, no ``weight``, a width that is not a whole number of heads, a sharded
    weight)."""
    if site.n_head is None:
        return None
    if site.fused is not None:
        weight = getattr(site.fused, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or weight.shape[0] % 3:
            return None
        if is_dtensor(weight):
            return None
        c = weight.shape[0] // 3
        if c % site.n_head:
            return None
        bias = getattr(site.fused, "bias", None)
        bias = bias if isinstance(bias, nn.Parameter) else None
        return QKHeads(
            site.name, site.n_head, site.n_head, c // site.n_head, weight, weight, 0, c, bias, bias
        )
    if site.q is None or site.k is None:
        return None
    qw, kw = getattr(site.q, "weight", None), getattr(site.k, "weight", None)
    if not isinstance(qw, nn.Parameter) or not isinstance(kw, nn.Parameter):
        return None
    if qw.dim() != 2 or kw.dim() != 2 or qw.shape[0] % site.n_head:
        return None
    if is_dtensor(qw) or is_dtensor(kw):
        return None
    d = qw.shape[0] // site.n_head
    if kw.shape[0] % d:
        return None
    qb, kb = getattr(site.q, "bias", None), getattr(site.k, "bias", None)
    return QKHeads(
        site.name,
        site.n_head,
        kw.shape[0] // d,
        d,
        qw,
        kw,
        q_bias=qb if isinstance(qb, nn.Parameter) else None,
        k_bias=kb if isinstance(kb, nn.Parameter) else None,
    )


@torch.no_grad()
def per_head_logit_max(
    q: Tensor, k: Tensor, n_head: int, n_kv_head: int | None = None, *, causal: bool = True
) -> Tensor:
    """q (b, T, h*d), k (b, T, h_kv*d) -> (h,) max |q.k|/sqrt(d) per query head, over the
    batch and the (i, j) pairs the model attends (j <= i when ``causal``). On the device, no
    host sync."""
    b, t, c = q.shape
    d = c // n_head
    qh = q.float().reshape(b, t, n_head, d).transpose(1, 2)  # (b, h, T, d)
    kv = n_kv_head or max(1, k.shape[-1] // d)
    kh = k.float().reshape(b, k.shape[1], kv, d).transpose(1, 2)  # (b, h_kv, T, d)
    if kv != n_head:
        kh = kh.repeat_interleave(n_head // kv, dim=1)  # (b, h, T, d)
    scale = 1.0 / math.sqrt(d)
    best = qh.new_zeros(n_head)
    for start in range(0, t, _CHUNK):
        logits = (qh[:, :, start : start + _CHUNK] @ kh.transpose(-1, -2)).abs()  # (b,h,c,T)
        if causal:
            rows = torch.arange(start, min(t, start + _CHUNK), device=q.device)[:, None]
            cols = torch.arange(kh.shape[2], device=q.device)[None, :]
            logits = logits.masked_fill(cols > rows, 0.0)
        best = torch.maximum(best, logits.amax(dim=(0, 2, 3)) * scale)
    return best


@dataclass(frozen=True)
class QKClipResult:
    """What one QK-Clip did: per site, the heads it rescaled and their max logits before."""

    tau: float
    clipped: dict[str, list[int]]
    logit_max: dict[str, list[float]]

    @property
    def heads_clipped(self) -> int:
        return sum(len(h) for h in self.clipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "qk_clip",
            "tau": self.tau,
            "heads_clipped": self.heads_clipped,
            "clipped": {k: list(v) for k, v in self.clipped.items()},
            "logit_max": {k: list(v) for k, v in self.logit_max.items()},
        }


def _scale_rows(weight: Tensor, bias: Tensor | None, offset: int, rows: Tensor) -> None:
    """weight[offset : offset + len(rows)] *= rows[:, None] (and the bias), in place."""
    n = rows.shape[0]
    w = weight.detach()
    w[offset : offset + n].mul_(rows.to(w.dtype)[:, None])
    if bias is not None:
        bias.detach()[offset : offset + n].mul_(rows.to(bias.dtype))


@torch.no_grad()
def apply_qk_clip(
    heads: Sequence[QKHeads], logit_max: Mapping[str, Tensor], tau: float, *, report: bool = True
) -> QKClipResult:
    """Rescales the query/key rows of every head whose max logit is above ``tau``.

    ``logit_max``: site name -> (n_head,) per-head max logits (sites without one are left
    alone). ``report=False`` keeps the whole operation on the device (no host read); the
    result then lists no heads.
    """
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not (0 < tau < math.inf):
        raise ConfigError(f"args.tau: expected a finite number > 0, got {tau!r}")
    clipped: dict[str, list[int]] = {}
    before: dict[str, list[float]] = {}
    for h in heads:
        s = logit_max.get(h.site)
        if s is None:
            continue
        s = s.detach().float().to(h.q_weight.device).reshape(-1)
        if s.shape[0] != h.n_head:
            raise ConfigError(
                f"logit_max[{h.site!r}]: expected {h.n_head} per-head values, got {s.shape[0]}"
            )
        # gamma = 1 exactly for heads at or under tau (and for a non-finite S: nothing to
        # learn from it), so those rows are multiplied by 1.0 and stay bit-identical
        over = torch.isfinite(s) & (s > tau)
        gamma = torch.where(over, tau / s.clamp(min=tau), torch.ones_like(s))
        d = h.head_dim
        if h.n_kv_head == h.n_head:
            root = gamma.sqrt().repeat_interleave(d)
            _scale_rows(h.q_weight, h.q_bias, h.q_offset, root)
            _scale_rows(h.k_weight, h.k_bias, h.k_offset, root)
        else:  # GQA: a key head is shared, so the query head takes the whole factor
            _scale_rows(h.q_weight, h.q_bias, h.q_offset, gamma.repeat_interleave(d))
        if report:
            flags = over.tolist()  # one small read per site, at a command or an incident
            clipped[h.site] = [i for i, f in enumerate(flags) if f]
            before[h.site] = [float(v) for v in s.tolist()]
    return QKClipResult(float(tau), clipped, before)
