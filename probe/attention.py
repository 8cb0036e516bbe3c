"""Attention sites: where a model computes attention, and its logits as the model uses them.

A site is found by what the module does (:func:`find_attention_sites`): its ``forward`` (or
a method of its class that ``forward`` calls) calls ``F.scaled_dot_product_attention`` or
Hugging Face's attention interface (``ALL_ATTENTION_FUNCTIONS``), or applies a softmax
over its own projections (hand-written attention). The innermost such module is the site.
Names are the fallback (q/k projection pairs, a fused QKV projection, with a head count), and
the user's ``attention=`` globs with ``attention_heads`` always win.

Logits: at a sampled step the site's call is captured (its first sequences); afterwards the
probe replays the module (:mod:`.replay`: invisible, no cache) under :class:`LogitRecorder`,
which intercepts the attention computation *after* rotary embeddings, qk-norm and GQA
bookkeeping, reads q, k, the mask, ``is_causal`` and the scale, and stops the replay there:

- Hugging Face's interface (any implementation: eager, sdpa, flash, flex): the call's
  ``query``, ``key``, ``attention_mask``, ``scaling``, ``is_causal``/``module.is_causal``,
  ``sliding_window``;
- ``F.scaled_dot_product_attention``: ``query``, ``key``, ``attn_mask``, ``is_causal``,
  ``scale``, ``enable_gqa``;
- a softmax over the last dim of a 4-D (b, heads, T, S) tensor: its input is the scaled,
  masked logit matrix itself; masked entries (−inf or ≤ half the dtype's minimum) are left out.

The result is max |q·kᵀ·scale| over the positions the mask allows, per head.
Where only the projections are reachable (names or globs, no attention call found), the probe
reports a different quantity, ``attention_logit_bound``: per head
max_i ‖q_i‖ · max_j ‖k_j‖ · scale, which bounds |q_i·k_j|·scale for every pair whatever the
mask and any norm-preserving position encoding (rotary) — an upper bound, never the logit.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .replay import AutocastState, invisible, stateless

__all__ = [
    "AttentionSite",
    "LogitRecorder",
    "SiteSearch",
    "attention_modules",
    "find_attention_sites",
    "head_logit_max",
    "projection_bound",
    "scores_head_max",
]

_HEAD_ATTRS = ("n_head", "num_heads", "n_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("n_kv_head", "num_key_value_heads", "n_kv_heads", "num_kv_heads")
_QK_PAIRS = (("q_proj", "k_proj"), ("query", "key"), ("wq", "wk"), ("to_q", "to_k"))
_FUSED = ("c_attn", "qkv", "qkv_proj", "Wqkv", "query_key_value")
_Q_LEAVES = frozenset({"q", "q_proj", "query", "wq", "to_q", "q_lin"})
_K_LEAVES = frozenset({"k", "k_proj", "key", "wk", "to_k", "k_lin"})
_CALL_NAMES = frozenset({"scaled_dot_product_attention", "ALL_ATTENTION_FUNCTIONS"})
_CHUNK = 256  # query rows per block: bounds the (b, h, chunk, S) logits buffer

LOOKED_FOR = (
    "modules whose forward calls torch.nn.functional.scaled_dot_product_attention, Hugging "
    "Face's attention interface (ALL_ATTENTION_FUNCTIONS) or a softmax over its own "
    "projections; by name, q/k projection pairs (q_proj/k_proj, query/key, wq/wk, to_q/to_k) "
    "or a fused QKV projection (c_attn, qkv, qkv_proj, Wqkv, query_key_value) beside a head "
    "count (n_head, num_heads, n_heads, num_attention_heads). Name them with "
    "attention=[globs of the q and k weights] and attention_heads=N"
)


@dataclass(eq=False)
class AttentionSite:
    """One attention module.

    ``replay``: its forward computes attention where :class:`LogitRecorder` sees it (found by
    what it does), so its exact logits are read by replaying it. ``q``/``k`` or ``fused``
    with ``n_head``: its projections are reachable, for the upper bound.
    """

    name: str  # the attention module's name (the quantities' target)
    module: nn.Module
    replay: bool
    n_head: int | None = None
    n_kv_head: int | None = None
    fused: nn.Module | None = None
    q: nn.Module | None = None
    k: nn.Module | None = None

    @property
    def has_projections(self) -> bool:
        return self.n_head is not None and (
            self.fused is not None or (self.q is not None and self.k is not None)
        )


@dataclass
class SiteSearch:
    """What :func:`find_attention_sites` found, and how."""

    sites: list[AttentionSite] = field(default_factory=list)
    by_call: int = 0
    by_name: int = 0
    explicit: bool = False


def find_attention_sites(
    model: nn.Module,
    *,
    explicit: Sequence[tuple[str, str]] | None = None,
    heads: int | None = None,
) -> SiteSearch:
    """The model's attention sites. ``explicit``: (module name, parameter name) of the weights
    the user's ``attention=`` globs selected; their parent modules are the sites (they win
    over any detection), with ``heads`` as the head count where the module has none."""
    modules = dict(model.named_modules())
    if explicit is not None:
        return SiteSearch(_explicit_sites(modules, explicit, heads), explicit=True)
    detected = [n for n, m in modules.items() if _computes_attention(m)]
    # the innermost: a detected module with a detected descendant is a wrapper (a block)
    innermost = [n for n in detected if not any(o.startswith(n + ".") for o in detected if n)]
    if "" in innermost and len(innermost) > 1:
        innermost.remove("")
    search = SiteSearch()
    for name in innermost:
        site = _site(name, modules[name], replay=True)
        search.sites.append(site)
        search.by_call += 1
    covered = set(innermost)
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention) or _covered(name, covered):
            continue  # MHA: q, k live inside its fused kernel
        site = _site(name, module, replay=False)
        if site.has_projections:
            search.sites.append(site)
            search.by_name += 1
    return search


def attention_modules(sites: Iterable[AttentionSite]) -> list[str]:
    """The sites whose direct projections are the attention's own (at most four: q, k, v, o;
    more means the module also holds an MLP, as a block computing attention inline does)."""
    return [s.name for s in sites if sum(1 for c in s.module.children() if _is_projection(c)) <= 4]


def _covered(name: str, covered: Iterable[str]) -> bool:
    return any(name == c or name.startswith(c + ".") or c.startswith(name + ".") for c in covered)


def _site(name: str, module: nn.Module, *, replay: bool) -> AttentionSite:
    n_head, n_kv = _head_counts(module)
    children = dict(module.named_children())
    fused = next((children[f] for f in _FUSED if f in children), None)
    q = k = None
    if fused is None:
        for qn, kn in _QK_PAIRS:
            if qn in children and kn in children:
                q, k = children[qn], children[kn]
                break
    return AttentionSite(name, module, replay, n_head, n_kv, fused=fused, q=q, k=k)


def _explicit_sites(
    modules: Mapping[str, nn.Module], weights: Sequence[tuple[str, str]], heads: int | None
) -> list[AttentionSite]:
    """Sites from the user's globs: the parent of the matched projections; q and k by leaf
    name, else the first two matched weights in the module's own order."""
    by_parent: dict[str, list[tuple[str, str]]] = {}
    for module_name, param_name in weights:
        parent = module_name.rpartition(".")[0]
        by_parent.setdefault(parent, []).append((module_name, param_name))
    sites: list[AttentionSite] = []
    for parent, members in by_parent.items():
        module = modules[parent]
        n_head, n_kv = _head_counts(module)
        n_head = n_head or heads
        leaves = {m.rpartition(".")[2]: m for m, _ in members}
        fused_parts = [m for m, p in members if p.endswith("[q]") or p.endswith("[k]")]
        site = AttentionSite(parent, module, _computes_attention(module), n_head, n_kv)
        if fused_parts:
            site.fused = modules[fused_parts[0]]
        else:
            qn = next((leaves[x] for x in leaves if x in _Q_LEAVES), None)
            kn = next((leaves[x] for x in leaves if x in _K_LEAVES), None)
            ordered = list(dict.fromkeys(m for m, _ in members))
            if (qn is None or kn is None) and len(ordered) >= 2:
                qn, kn = ordered[0], ordered[1]
            if qn is not None and kn is not None:
                site.q, site.k = modules[qn], modules[kn]
        sites.append(site)
    return sites


def _head_counts(module: nn.Module) -> tuple[int | None, int | None]:
    cfg = getattr(module, "config", None)
    n_head = _int_attr(module, _HEAD_ATTRS) or (_int_attr(cfg, _HEAD_ATTRS) if cfg else None)
    n_kv = _int_attr(module, _KV_HEAD_ATTRS) or (_int_attr(cfg, _KV_HEAD_ATTRS) if cfg else None)
    return n_head, n_kv


def _int_attr(obj: object, names: Iterable[str]) -> int | None:
    for a in names:
        v = getattr(obj, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _computes_attention(module: nn.Module) -> bool:
    """Whether the module's forward (or a method of its class it calls) calls SDPA or HF's
    attention interface, or applies a softmax beside two projections of its own."""
    if isinstance(module, nn.MultiheadAttention):
        return False
    forward = getattr(type(module), "forward", None)
    if forward is None or forward is nn.Module.forward:
        return False
    names = _code_names(forward)
    for name in list(names):
        method = getattr(type(module), name, None)
        if inspect.isfunction(method) and name != "forward":
            names |= _code_names(method)
    if names & _CALL_NAMES:
        return True
    projections = sum(1 for c in module.children() if _is_projection(c))
    return "softmax" in names and projections >= 2


def _code_names(fn: Callable[..., Any]) -> set[str]:
    """Global and attribute names the function's code uses, with aliases resolved: a global
    bound to SDPA or to the attention interface counts under its real name."""
    try:
        fn = inspect.unwrap(fn)
        code = fn.__code__
    except (AttributeError, ValueError):
        return set()
    names = set(code.co_names)
    for const in code.co_consts:  # nested functions (closures) defined in forward
        if inspect.iscode(const):
            names |= set(const.co_names)
    globals_ = getattr(fn, "__globals__", {})
    for name in list(names):
        value = globals_.get(name)
        if value is F.scaled_dot_product_attention:
            names.add("scaled_dot_product_attention")
        elif type(value).__name__ == "AttentionInterface":
            names.add("ALL_ATTENTION_FUNCTIONS")
    return names


def _is_projection(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
    )


# -- logits ------------------------------------------------------------------------------


def head_logit_max(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    is_causal: bool = False,
    sliding_window: int | None = None,
) -> Tensor:
    """q (b, h, T, d), k (b, h_kv, S, d) -> (h,) fp32: max over batch and the allowed (i, j)
    of |q_i·k_j|·scale. ``mask``: bool (True = attend) or additive float, broadcastable to
    (b, h, T, S); ``is_causal``: j ≤ i (top-left aligned, as SDPA); ``sliding_window``:
    i − j < window. Grouped-query attention: kv head g serves query heads g·r..(g+1)·r−1."""
    _, h, t, d = q.shape
    s = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k = q.float(), k.float()
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)  # (b, h, S, d)
    best = q.new_full((h,), -math.inf)
    cols = torch.arange(s, device=q.device)
    for start in range(0, t, _CHUNK):
        rows = torch.arange(start, min(t, start + _CHUNK), device=q.device)
        logits = (q[:, :, start : start + _CHUNK] @ k.transpose(-1, -2)).abs() * scale
        allowed = torch.ones(rows.numel(), s, dtype=torch.bool, device=q.device)
        if is_causal:
            allowed &= cols[None, :] <= rows[:, None]
        if sliding_window is not None:
            allowed &= rows[:, None] - cols[None, :] < sliding_window
        keep = allowed.expand_as(logits)
        if mask is not None:
            m = mask[..., start : start + _CHUNK, :]
            if m.dtype != torch.bool:
                m = m > torch.finfo(m.dtype).min / 2  # additive: ~0 where allowed
            keep = keep & m.expand_as(logits)
        masked = torch.where(keep, logits, logits.new_full((), -math.inf))
        best = torch.maximum(best, masked.amax(dim=(0, 2, 3)))
    return torch.where(torch.isneginf(best), torch.zeros_like(best), best)


def scores_head_max(scores: Tensor) -> Tensor:
    """(b, h, T, S) pre-softmax logits -> (h,) fp32 max |x| over the entries the mask left
    (−inf, NaN and additive-mask values ≤ half the dtype's minimum are left out)."""
    floor = torch.finfo(scores.dtype).min / 2
    x = scores.detach()
    keep = x > floor  # False for -inf, NaN and the additive mask's minimum
    masked = torch.where(keep, x.float().abs(), x.new_full((), -math.inf, dtype=torch.float32))
    best = masked.amax(dim=(0, 2, 3))
    return torch.where(torch.isneginf(best), torch.zeros_like(best), best)


def projection_bound(q: Tensor, k: Tensor, n_head: int, n_kv_head: int | None = None) -> Tensor:
    """q (b, T, h·d), k (b, S, h_kv·d) projection outputs -> (h,) fp32 upper bound of every
    logit: max_i ‖q_i‖ · max_j ‖k_j‖ / √d per head (Cauchy–Schwarz; rotations keep norms)."""
    b, t, c = q.shape
    d = c // n_head
    kv = n_kv_head or max(1, k.shape[-1] // d)
    qn = torch.linalg.vector_norm(q.float().reshape(b, t, n_head, d), dim=-1).amax(dim=(0, 1))
    kn = torch.linalg.vector_norm(k.float().reshape(b, k.shape[1], kv, d), dim=-1)
    kn = kn.amax(dim=(0, 1)).repeat_interleave(n_head // kv)  # (h,)
    bound: Tensor = qn * kn / math.sqrt(d)
    return bound


class _Stop(Exception):
    """Ends a replay once the attention's inputs are read (nothing after it is needed)."""


class LogitRecorder(TorchFunctionMode):
    """Replays an attention module and reads its per-head max logit where attention is
    computed; see the module docstring for what is intercepted."""

    def __init__(self) -> None:
        super().__init__()
        self.result: Tensor | None = None
        self._thread = threading.get_ident()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            self._from_sdpa(*args, **kwargs)
        elif func in _SOFTMAX:
            x = args[0] if args else kwargs.get("input")
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(x, Tensor) and x.dim() == 4 and dim in (-1, 3):
                self.result = scores_head_max(x)
                raise _Stop
        return func(*args, **kwargs)

    def _from_sdpa(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> None:
        if query.dim() != 4:
            return  # not (b, h, T, d): nothing the per-head view can read
        self.result = head_logit_max(query, key, scale=scale, mask=attn_mask, is_causal=is_causal)
        raise _Stop

    def hf_interface(
        self, module: nn.Module, query: Tensor, key: Tensor, *rest: Any, **kw: Any
    ) -> Any:
        """Stands in for Hugging Face's attention function during a replay."""
        mask = rest[1] if len(rest) > 1 else kw.get("attention_mask")
        is_causal = kw.get("is_causal")
        if is_causal is None:
            is_causal = bool(getattr(module, "is_causal", False))
        causal = mask is None and bool(is_causal) and query.shape[2] > 1
        window = kw.get("sliding_window") if mask is None else None
        self.result = head_logit_max(
            query,
            key,
            scale=kw.get("scaling"),
            mask=mask,
            is_causal=causal,
            sliding_window=window if isinstance(window, int) and window > 0 else None,
        )
        raise _Stop

    @contextlib.contextmanager
    def hf_patched(self) -> Iterator[None]:
        """Hugging Face's interface lookup returns :meth:`hf_interface` on this thread while
        the replay runs (other threads keep the real one). Nothing happens without
        transformers loaded."""
        utils = sys.modules.get("transformers.modeling_utils")
        interface = getattr(utils, "ALL_ATTENTION_FUNCTIONS", None)
        if interface is None:
            yield
            return
        original = interface.get_interface
        shadowed = "get_interface" in vars(interface)  # someone's own patch: put it back

        def get_interface(implementation: Any, default: Callable[..., Any]) -> Callable[..., Any]:
            if threading.get_ident() != self._thread:
                return original(implementation, default)  # type: ignore[no-any-return]
            return self.hf_interface

        interface.get_interface = get_interface
        try:
            yield
        finally:
            if shadowed:
                interface.get_interface = original
            else:
                del interface.get_interface  # the class's method again

    def replay(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        autocast: AutocastState | None = None,
    ) -> Tensor | None:
        """Runs ``module`` on a captured call, invisibly, without its cache and under the
        autocast it ran under; returns the per-head max logit (h,) fp32, or None when the
        forward computed no attention the recorder could see."""
        self.result = None
        clean_args, clean_kwargs = stateless(args, kwargs)
        cast = autocast.context() if autocast is not None else contextlib.nullcontext()
        with (
            invisible([module]),
            torch.no_grad(),
            cast,
            self.hf_patched(),
            self,
            contextlib.suppress(_Stop),
        ):
            module(*clean_args, **clean_kwargs)
        return self.result


_SOFTMAX: frozenset[Callable[..., Any]] = frozenset(
    {F.softmax, torch.softmax, Tensor.softmax, torch.Tensor.softmax}
)
