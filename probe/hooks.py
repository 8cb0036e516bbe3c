"""Hooks the probe puts on the model, and what they keep.

Every hook is registered only for a sampled step (armed at the end of the previous
``probe.step``) and removed at the end of the sampled ``probe.step``: on other steps the model
carries no probe hook at all. Hooks keep bounded, detached fp32 summaries (at most
``max_rows`` input rows per module, at most ``max_sequences`` sequences of attention
projections), never a whole activation, and never raise into the forward pass: an error is
logged once and the hook goes quiet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .targets import WeightTarget

__all__ = [
    "AttentionSite",
    "CallCapture",
    "Captures",
    "HookSet",
    "ProbeHooks",
    "find_attention_sites",
    "slice_batch",
    "subsample_rows",
]

logger = logging.getLogger("rankguard.probe")

_HEAD_ATTRS = ("n_head", "num_heads", "n_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("n_kv_head", "num_key_value_heads", "n_kv_heads", "num_kv_heads")
_QK_PAIRS = (("q_proj", "k_proj"), ("query", "key"), ("wq", "wk"))
_FUSED = ("c_attn", "qkv", "qkv_proj", "Wqkv")


class HookSet:
    """Owns every handle the probe registered; ``remove_all`` leaves the model clean."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def __len__(self) -> int:
        return len(self._handles)

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def subsample_rows(x: Tensor, max_rows: int) -> Tensor:
    """(..., in) -> (<= max_rows, in) fp32 copy: evenly strided rows, so the sample spans the
    whole batch and sequence. Shapes only: no host sync."""
    rows = x.detach().reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n > max_rows:
        stride = -(-n // max_rows)  # ceil
        rows = rows[::stride][:max_rows]
    # always a copy: the caller keeps it past the forward, which may reuse the buffer
    return rows.to(torch.float32, copy=True)


def slice_batch(value: Any, batch: int, n: int) -> Any:
    """The first ``n`` sequences of every tensor whose leading dim is ``batch`` (detached
    copies); other values unchanged. Recurses into tuples, lists and dicts."""
    if isinstance(value, Tensor):
        if value.dim() >= 1 and value.shape[0] == batch:
            return value.detach()[:n].clone()
        return value.detach()
    if isinstance(value, tuple):
        return tuple(slice_batch(v, batch, n) for v in value)
    if isinstance(value, list):
        return [slice_batch(v, batch, n) for v in value]
    if isinstance(value, dict):
        return {k: slice_batch(v, batch, n) for k, v in value.items()}
    return value


def _first_tensor(args: Iterable[Any], kwargs: Mapping[str, Any]) -> Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor):
            return v
    return None


@dataclass
class CallCapture:
    """The (args, kwargs) of one call, cut to the first ``n`` sequences."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: Mapping[str, Any], n: int) -> CallCapture:
        first = _first_tensor(args, kwargs)
        batch = int(first.shape[0]) if first is not None and first.dim() >= 1 else -1
        return cls(slice_batch(tuple(args), batch, n), slice_batch(dict(kwargs), batch, n))


@dataclass(frozen=True)
class AttentionSite:
    """Where q and k of one attention module can be read: a fused projection (output
    (B, T, 3C) split in thirds) or separate q/k projections."""

    name: str  # the attention module's name (the quantity's target)
    n_head: int
    n_kv_head: int | None
    fused: nn.Module | None = None
    q: nn.Module | None = None
    k: nn.Module | None = None


def _int_attr(module: nn.Module, names: Iterable[str]) -> int | None:
    for a in names:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Attention modules whose q and k projections are reachable by a forward hook, with the
    head count read from ``n_head``/``num_heads``/``n_heads`` (also on the module's config)."""
    sites: list[AttentionSite] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            continue  # q, k are computed inside F.multi_head_attention_forward: not reachable
        n_head = _int_attr(module, _HEAD_ATTRS)
        cfg = getattr(module, "config", None)
        if n_head is None and cfg is not None:
            n_head = _int_attr(cfg, _HEAD_ATTRS)
        if n_head is None:
            continue
        n_kv = _int_attr(module, _KV_HEAD_ATTRS)
        if n_kv is None and cfg is not None:
            n_kv = _int_attr(cfg, _KV_HEAD_ATTRS)
        children = dict(module.named_children())
        fused = next((children[f] for f in _FUSED if f in children), None)
        if fused is not None:
            sites.append(AttentionSite(name, n_head, n_kv, fused=fused))
            continue
        for qn, kn in _QK_PAIRS:
            if qn in children and kn in children:
                sites.append(AttentionSite(name, n_head, n_kv, q=children[qn], k=children[kn]))
                break
    return sites


@dataclass
class Captures:
    """What the hooks of one sampled step kept."""

    inputs: dict[str, Tensor] = field(default_factory=dict)  # target name -> (N, in) fp32
    qk: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # site -> (q, k)
    grad_norms: dict[str, Tensor] = field(default_factory=dict)  # param name -> 0-d fp32
    grad_non_finite: dict[str, Tensor] = field(default_factory=dict)  # param name -> 0-d

    def clear(self) -> None:
        self.inputs.clear()
        self.qk.clear()
        self.grad_norms.clear()
        self.grad_non_finite.clear()


class _Guard:
    """Runs hook bodies so that an error is logged once and never reaches the forward."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.failed: set[str] = set()

    def wrap(self, key: str, fn: Callable[..., None]) -> Callable[..., None]:
        def hook(*args: Any, **kwargs: Any) -> None:
            if key in self.failed:
                return None
            try:
                fn(*args, **kwargs)
            except Exception:
                if self.strict:
                    raise
                self.failed.add(key)
                logger.warning("rankguard: hook %s failed; it is disabled", key, exc_info=True)
            return None

        return hook


def _linear_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    return _first_tensor((), kwargs)


_MHA_INPUTS = {"q": (0, "query"), "k": (1, "key"), "v": (2, "value")}


class ProbeHooks:
    """Arms the hooks one sampled step needs and removes them all afterwards."""

    def __init__(
        self,
        model: nn.Module,
        targets: Iterable[WeightTarget],
        sites: Iterable[AttentionSite],
        *,
        max_rows: int,
        max_sequences: int,
        strict: bool,
    ) -> None:
        self.handles = HookSet()
        self.captures = Captures()
        self.guard = _Guard(strict)
        self._model = model
        self._modules = dict(model.named_modules())
        self._by_module: dict[str, list[WeightTarget]] = {}
        for t in targets:
            self._by_module.setdefault(t.module_name, []).append(t)
        self._sites = list(sites)
        self._max_rows = max_rows
        self._max_sequences = max_sequences

    def arm_inputs(self) -> None:
        """Pre-hooks keeping <= max_rows input rows (fp32) of every target's module."""
        for module_name, targets in self._by_module.items():
            module = self._modules[module_name]
            if isinstance(module, nn.MultiheadAttention):
                hook = self._mha_input_hook(targets)
            else:
                hook = self._linear_input_hook(targets)
            self.handles.add(
                module.register_forward_pre_hook(
                    self.guard.wrap(f"inputs:{module_name}", hook), with_kwargs=True
                )
            )

    def _linear_input_hook(self, targets: list[WeightTarget]) -> Callable[..., None]:
        names = [t.name for t in targets]
        inputs, max_rows = self.captures.inputs, self._max_rows

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _linear_input(args, kwargs)
            if x is None:
                return
            rows = subsample_rows(x, max_rows)  # (N, in): fused parts share one copy
            for name in names:
                inputs[name] = rows

        return hook

    def _mha_input_hook(self, targets: list[WeightTarget]) -> Callable[..., None]:
        inputs, max_rows = self.captures.inputs, self._max_rows

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            for t in targets:
                part = t.name.rpartition("[")[2].rstrip("]")
                if part not in _MHA_INPUTS:
                    continue  # out_proj: its input is internal to the attention
                pos, key = _MHA_INPUTS[part]
                x = args[pos] if len(args) > pos else kwargs.get(key)
                if isinstance(x, Tensor):
                    inputs[t.name] = subsample_rows(x, max_rows)

        return hook

    def arm_attention(self) -> None:
        """Forward hooks keeping the q and k projections of <= max_sequences sequences."""
        n = self._max_sequences
        qk = self.captures.qk
        for site in self._sites:
            if site.fused is not None:

                def fused_hook(
                    module: nn.Module, args: Any, out: Any, site: AttentionSite = site
                ) -> None:
                    if not isinstance(out, Tensor) or out.dim() != 3:
                        return
                    c = out.shape[-1] // 3
                    y = out.detach()[:n]  # (b, T, 3C)
                    qk[site.name] = (y[..., :c].float(), y[..., c : 2 * c].float())

                self.handles.add(
                    site.fused.register_forward_hook(
                        self.guard.wrap(f"attention:{site.name}", fused_hook)
                    )
                )
            elif site.q is not None and site.k is not None:
                partial: dict[str, Tensor] = {}

                def q_hook(
                    module: nn.Module, args: Any, out: Any, partial: dict[str, Tensor] = partial
                ) -> None:
                    if isinstance(out, Tensor) and out.dim() == 3:
                        partial["q"] = out.detach()[:n].float()

                def k_hook(
                    module: nn.Module,
                    args: Any,
                    out: Any,
                    site: AttentionSite = site,
                    partial: dict[str, Tensor] = partial,
                ) -> None:
                    if isinstance(out, Tensor) and out.dim() == 3 and "q" in partial:
                        qk[site.name] = (partial.pop("q"), out.detach()[:n].float())

                self.handles.add(
                    site.q.register_forward_hook(self.guard.wrap(f"attention:{site.name}", q_hook))
                )
                self.handles.add(
                    site.k.register_forward_hook(self.guard.wrap(f"attention:{site.name}", k_hook))
                )

    def arm_grads(self, params: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Post-accumulate-grad hooks measuring each gradient as backward produces it: before
        any clipping, and whether or not ``zero_grad`` runs before ``probe.step``. With
        gradient accumulation the last micro-batch's call (the full gradient) wins."""
        norms, bad = self.captures.grad_norms, self.captures.grad_non_finite
        for name, p in params:
            if not p.requires_grad:
                continue

            def hook(p: Tensor, name: str = name) -> None:
                g = p.grad
                if g is None:
                    return
                g = g.detach()
                norms[name] = torch.linalg.vector_norm(g, dtype=torch.float32)
                bad[name] = (~torch.isfinite(g)).sum()

            self.handles.add(
                p.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                    self.guard.wrap(f"grad:{name}", hook)
                )
            )

    def capture_call(
        self,
        module: nn.Module,
        sink: dict[str, CallCapture],
        key: str,
        *,
        handles: HookSet | None = None,
        sequences: int | None = None,
    ) -> None:
        """A pre-hook storing the first ``sequences`` (default ``max_sequences``) sequences
        of the first call."""
        n = sequences if sequences is not None else self._max_sequences

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if key not in sink:
                sink[key] = CallCapture.of(args, kwargs, n)

        (handles if handles is not None else self.handles).add(
            module.register_forward_pre_hook(self.guard.wrap(f"call:{key}", hook), with_kwargs=True)
        )

    @property
    def live(self) -> bool:
        return len(self.handles) > 0

    def disarm(self) -> None:
        self.handles.remove_all()
