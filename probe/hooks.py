"""Hooks the probe puts on the model, and what they keep.

Every hook is registered only for a sampled step (armed at the end of the previous
``probe.step``) and removed at the end of the sampled ``probe.step``: on other steps the model
carries no probe hook at all. Under ``torch.compile`` (``persistent``) the forward hooks are
instead registered once and switched on for sampled steps, because compiled code never calls
a hook registered after it was compiled; the switch costs one extra graph, compiled at the
first sampled step, and no recompilation after it.

Hooks keep bounded, detached summaries (at most ``max_rows`` fp32 input rows per module; the
first ``max_sequences`` sequences of each attention call; the first ``jacobian_sequences``
of each block call, without any KV cache), never a whole activation, and never raise into
the forward pass: an error is logged once and the hook goes quiet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .attention import AttentionSite
from .replay import AutocastState, is_stateful
from .targets import WeightTarget

__all__ = [
    "CallCapture",
    "Captures",
    "HookSet",
    "ProbeHooks",
    "slice_batch",
    "subsample_rows",
]

logger = logging.getLogger("rankguard.probe")


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
    copies); a KV cache becomes None (a replay must neither read nor grow it); other values
    unchanged. Recurses into tuples, lists and dicts."""
    if is_stateful(value):
        return None
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
    """The (args, kwargs) of one call, cut to the first ``n`` sequences, without its KV cache,
    and the autocast it ran under."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    autocast: AutocastState | None = None

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: Mapping[str, Any], n: int) -> CallCapture:
        first = _first_tensor(args, kwargs)
        batch = int(first.shape[0]) if first is not None and first.dim() >= 1 else -1
        return cls(
            slice_batch(tuple(args), batch, n),
            slice_batch(dict(kwargs), batch, n),
            AutocastState.of(first),
        )


@dataclass
class Captures:
    """What the hooks of one sampled step kept."""

    inputs: dict[str, Tensor] = field(default_factory=dict)  # target name -> (N, in) fp32
    qk: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # site -> (q, k)
    calls: dict[str, CallCapture] = field(default_factory=dict)  # attention site -> its call
    blocks: dict[str, CallCapture] = field(default_factory=dict)  # block name -> its call
    grad_norms: dict[str, Tensor] = field(default_factory=dict)  # param name -> 0-d fp32
    grad_non_finite: dict[str, Tensor] = field(default_factory=dict)  # param name -> 0-d

    def clear(self) -> None:
        self.inputs.clear()
        self.qk.clear()
        self.calls.clear()
        self.blocks.clear()
        self.grad_norms.clear()
        self.grad_non_finite.clear()


class _Guard:
    """Runs hook bodies so that an error is logged once and never reaches the forward, and
    only while the probe's hooks are switched on (``active``: always, unless persistent)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.active = False
        self.failed: set[str] = set()

    def wrap(self, key: str, fn: Callable[..., None]) -> Callable[..., None]:
        def hook(*args: Any, **kwargs: Any) -> None:
            if not self.active or key in self.failed:
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

INPUTS, ATTENTION, BLOCKS = "inputs", "attention", "blocks"
"""The kinds of forward hook (``ProbeHooks.arm``'s ``kinds``)."""


class ProbeHooks:
    """Arms the hooks one sampled step needs and removes them all afterwards; ``persistent``
    (torch.compile): registers the forward hooks once and switches them on and off."""

    def __init__(
        self,
        model: nn.Module,
        targets: Iterable[WeightTarget],
        sites: Iterable[AttentionSite],
        blocks: Iterable[tuple[str, nn.Module]],
        *,
        max_rows: int,
        max_sequences: int,
        block_sequences: int,
        strict: bool,
        persistent: bool = False,
    ) -> None:
        self.handles = HookSet()  # removed at every disarm
        self.installed = HookSet()  # persistent forward hooks, removed at close
        self.captures = Captures()
        self.guard = _Guard(strict)
        self.persistent = persistent
        self._kinds: set[str] = set()  # forward hook kinds registered (persistent)
        self._modules = dict(model.named_modules())
        self._by_module: dict[str, list[WeightTarget]] = {}
        for t in targets:
            self._by_module.setdefault(t.module_name, []).append(t)
        self.sites = list(sites)
        self._blocks = list(blocks)
        self._max_rows = max_rows
        self._max_sequences = max_sequences
        self._block_sequences = block_sequences

    def arm(self, kinds: Iterable[str], params: Iterable[tuple[str, nn.Parameter]] = ()) -> None:
        """Registers (or switches on) the forward hooks of ``kinds`` and, with ``params``, the
        gradient hooks, for the next forward/backward."""
        self.guard.active = True
        for kind in kinds:
            if self.persistent and kind in self._kinds:
                continue
            self._kinds.add(kind)
            handles = self.installed if self.persistent else self.handles
            {INPUTS: self._arm_inputs, ATTENTION: self._arm_attention, BLOCKS: self._arm_blocks}[
                kind
            ](handles)
        params = list(params)
        if params:
            self._arm_grads(params)

    def disarm(self) -> None:
        """Removes the per-sample hooks and switches the persistent ones off."""
        self.guard.active = False
        self.handles.remove_all()
        if not self.persistent:
            self._kinds.clear()

    def remove(self) -> None:
        """Removes every hook, persistent ones included (the probe closes)."""
        self.disarm()
        self.installed.remove_all()
        self._kinds.clear()

    @property
    def live(self) -> bool:
        return len(self.handles) > 0 or (self.guard.active and len(self.installed) > 0)

    def _pre_hook(
        self, handles: HookSet, module: nn.Module, key: str, fn: Callable[..., None]
    ) -> None:
        handles.add(module.register_forward_pre_hook(self.guard.wrap(key, fn), with_kwargs=True))

    def _arm_inputs(self, handles: HookSet) -> None:
        """Pre-hooks keeping <= max_rows input rows (fp32) of every target's module."""
        for module_name, targets in self._by_module.items():
            module = self._modules[module_name]
            if isinstance(module, nn.MultiheadAttention):
                hook = self._mha_input_hook(targets)
            else:
                hook = self._linear_input_hook(targets)
            self._pre_hook(handles, module, f"inputs:{module_name}", hook)

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

    def _arm_blocks(self, handles: HookSet) -> None:
        """Pre-hooks keeping each block's call (its first ``block_sequences`` sequences):
        where the blocks are really called, whatever wraps the model."""
        for name, block in self._blocks:
            self._pre_hook(
                handles,
                block,
                f"block:{name}",
                self._call_hook(self.captures.blocks, name, self._block_sequences),
            )

    def _call_hook(self, sink: dict[str, CallCapture], key: str, n: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sink[key] = CallCapture.of(args, kwargs, n)

        return hook

    def _arm_attention(self, handles: HookSet) -> None:
        """Replayed sites: a pre-hook keeping the call (first ``max_sequences`` sequences).
        Projection-only sites: forward hooks keeping q and k of the same sequences."""
        for site in self.sites:
            key = f"attention:{site.name}"
            if site.replay:
                hook = self._call_hook(self.captures.calls, site.name, self._max_sequences)
                self._pre_hook(handles, site.module, key, hook)
            elif site.fused is not None:
                handles.add(
                    site.fused.register_forward_hook(self.guard.wrap(key, self._fused_hook(site)))
                )
            elif site.q is not None and site.k is not None:
                q_hook, k_hook = self._qk_hooks(site)
                handles.add(site.q.register_forward_hook(self.guard.wrap(key, q_hook)))
                handles.add(site.k.register_forward_hook(self.guard.wrap(key, k_hook)))

    def _fused_hook(self, site: AttentionSite) -> Callable[..., None]:
        n, qk = self._max_sequences, self.captures.qk

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, Tensor) or out.dim() != 3:
                return
            c = out.shape[-1] // 3
            y = out.detach()[:n]  # (b, T, 3C)
            qk[site.name] = (y[..., :c].float(), y[..., c : 2 * c].float())

        return hook

    def _qk_hooks(self, site: AttentionSite) -> tuple[Callable[..., None], Callable[..., None]]:
        n, qk = self._max_sequences, self.captures.qk
        partial: dict[str, Tensor] = {}

        def q_hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.dim() == 3:
                partial["q"] = out.detach()[:n].float()

        def k_hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.dim() == 3 and "q" in partial:
                qk[site.name] = (partial.pop("q"), out.detach()[:n].float())

        return q_hook, k_hook

    def _arm_grads(self, params: Iterable[tuple[str, nn.Parameter]]) -> None:
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
