"""Dense references for the model matrix, computed without the probe's code.

- attention: the model's own scores. Hugging Face models run with their eager attention,
  whose module-level ``eager_attention_forward`` (the function the model itself calls with
  its post-rotary, post-qk-norm q and k, its mask and its scale) is wrapped to keep q·kᵀ·scale
  over the positions its mask allows, in float64. nanoGPT and the hand-written block: q and k
  recomputed from the attention module's input with its own projections, causal mask.
- Jacobian: ``torch.autograd.functional.jacobian`` of each block at its captured input (first
  sequence), then ``torch.linalg.svd``.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def masked_head_max(q: Tensor, k: Tensor, allowed: Tensor) -> Tensor:
    """q (b, h, T, d), k (b, h, S, d) already scaled into q; allowed broadcastable to
    (b, h, T, S) -> (h,) float64 max |q·k| over the allowed pairs."""
    logits = (q.double() @ k.double().transpose(-1, -2)).abs()
    logits = torch.where(allowed.expand_as(logits), logits, torch.zeros_like(logits))
    return logits.amax(dim=(0, 2, 3))


@contextmanager
def hf_eager_scores(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Runs the body with the model's eager attention, recording per attention module name
    the (h,) max |q·kᵀ|·scale over the positions its mask allows."""
    names = {id(m): n for n, m in model.named_modules()}
    scores: dict[str, Tensor] = {}
    modules = {sys.modules[type(m).__module__] for m in model.modules()}
    patched = [m for m in modules if hasattr(m, "eager_attention_forward")]
    originals = {m: m.eager_attention_forward for m in patched}

    def wrap(original: Any) -> Any:
        def eager(
            module: nn.Module,
            query: Tensor,
            key: Tensor,
            value: Tensor,
            mask: Any,
            scaling: float,
            *a: Any,
            **kw: Any,
        ) -> Any:
            groups = query.shape[1] // key.shape[1]
            k = key.repeat_interleave(groups, dim=1)
            if mask is None:
                allowed = torch.ones(1, 1, query.shape[2], k.shape[2], dtype=torch.bool)
            elif mask.dtype == torch.bool:
                allowed = mask
            else:
                allowed = mask > torch.finfo(mask.dtype).min / 2
            scores[names[id(module)]] = masked_head_max(query * scaling, k, allowed)
            return original(module, query, key, value, mask, scaling, *a, **kw)

        return eager

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    for m in patched:
        m.eager_attention_forward = wrap(originals[m])
    try:
        yield scores
    finally:
        for m in patched:
            m.eager_attention_forward = originals[m]
        model.set_attn_implementation(previous)


def causal_scores(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """Projection outputs q, k (b, T, C), causal -> (h,) float64 max |q·k|/√d."""
    b, t, c = q.shape
    d = c // heads
    q = q.reshape(b, t, heads, d).transpose(1, 2) / math.sqrt(d)
    k = k.reshape(b, t, heads, d).transpose(1, 2)
    return masked_head_max(q, k, torch.ones(t, t, dtype=torch.bool).tril())


def without_cache(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block call without its KV cache (the reference's own copy of what the probe must do)."""
    is_cache = lambda v: type(v).__name__.endswith("Cache")  # noqa: E731
    args = tuple(None if is_cache(a) else a for a in args)
    kwargs = {k: (None if is_cache(v) or k == "cache" else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def first_sequence(value: Any, batch: int) -> Any:
    if isinstance(value, Tensor):
        return value[:1] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(first_sequence(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: first_sequence(v, batch) for k, v in value.items()}
    return value


def block_svd(
    block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """(u₁, σ, v₁) of the block's dense Jacobian at its first sequence's hidden input (σ: all
    singular values, descending)."""
    block = copy.deepcopy(block).eval()  # nothing of the test's reaches the model
    args, kwargs = without_cache(args, kwargs)
    batch = args[0].shape[0]
    args, kwargs = first_sequence(args, batch), first_sequence(kwargs, batch)
    h = args[0].detach().float()

    def f(x: Tensor) -> Tensor:
        out = block(x, *args[1:], **kwargs)
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    jac = torch.autograd.functional.jacobian(f, h)  # out_shape + in_shape
    out_numel = f(h).numel()
    u, s, vh = torch.linalg.svd(jac.reshape(out_numel, h.numel()).double())
    return u[:, 0], s, vh[0]
