"""The probe's own forward passes, invisible to the user's code and to the model's state.

The probe runs forwards of its own: the Jacobian's block products and the replay of an
attention module to read its logits. None of them may be seen by the training job:

- no hook fires: the user's module hooks (forward, pre-forward, backward) on every module the
  probe runs, and the global ``nn.Module`` hooks, are swapped out for the duration (a user's
  hook-based diagnostic would otherwise change at sampled steps);
- no state changes: every module runs in eval mode (each one's own flag restored), and every
  buffer is replaced by a copy for the duration, so an in-place update (a running mean, a
  step counter) lands on the copy;
- nothing is compiled: ``torch.compile``'d code runs eagerly (``set_stance("force_eager")``),
  so a probe forward never triggers a recompilation of the user's graph;
- no cache is replayed: a call captured from the training forward keeps no KV cache or other
  stateful argument (:func:`stateless`), so a replay neither reads stale keys nor grows a cache.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.modules.module as _module_globals
from torch import Tensor, nn

__all__ = [
    "AutocastState",
    "eager",
    "invisible",
    "is_stateful",
    "stateless",
]

# Per-module hook dicts (torch.nn.Module's own attribute names).
_MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
# The global hooks every module call consults (torch.nn.modules.module's globals).
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
# Keyword arguments that carry state from one call to the next (Hugging Face's KV cache under
# its current and former names, GPT-2's ``layer_past``), and the switch that asks for one.
_STATEFUL_KEYS = frozenset({"cache", "past_key_value", "past_key_values", "layer_past"})
_CACHE_SWITCHES = frozenset({"use_cache"})


_PLAIN = (Tensor, tuple, list, dict, str, int, float, bool, torch.dtype, torch.device)


def is_stateful(value: object) -> bool:
    """A KV cache (a class named ``*Cache``, or with one among its bases: ``DynamicCache``,
    ``StaticCache``, ``EncoderDecoderCache``...): an object a forward mutates. Called from
    hooks that torch.compile traces: plain values answer without looking at a class."""
    if value is None or isinstance(value, _PLAIN):
        return False
    if type(value).__name__.endswith("Cache"):
        return True
    if torch.compiler.is_compiling():
        return False  # walking the MRO would break the graph; HF's caches are named *Cache
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__)


def stateless(
    args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call without its state: caches become None, ``use_cache`` False."""
    clean_args = tuple(None if is_stateful(a) else a for a in args)
    clean: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _CACHE_SWITCHES:
            clean[key] = False
        elif key in _STATEFUL_KEYS or is_stateful(value):
            clean[key] = None
        else:
            clean[key] = value
    return clean_args, clean


@dataclass(frozen=True)
class AutocastState:
    """The autocast a call ran under (replayed so the replay computes in the same dtypes)."""

    device_type: str
    dtype: torch.dtype | None  # None: autocast was off

    @classmethod
    def of(cls, x: Tensor | None) -> AutocastState:
        device_type = x.device.type if x is not None else "cpu"
        if device_type not in ("cpu", "cuda", "xpu", "mps"):
            return cls(device_type, None)
        if not torch.is_autocast_enabled(device_type):
            return cls(device_type, None)
        return cls(device_type, torch.get_autocast_dtype(device_type))

    def context(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)


def eager(module: nn.Module) -> nn.Module:
    """The module behind a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``)."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


@contextlib.contextmanager
def invisible(roots: Sequence[nn.Module]) -> Iterator[None]:
    """Runs the body with every module under ``roots`` hook-free, in eval mode, on copies of
    its buffers, and eagerly. Afterwards every module's attributes (hooks, training flag,
    anything the forward assigned, such as a cached statistic) and buffers are as before,
    whatever the body raised."""
    modules = list({id(m): m for root in roots for m in root.modules()}.values())
    # shallow snapshots: what a forward rebinds is put back (in-place edits hit the copies)
    saved = [(m, dict(m.__dict__), dict(m._buffers)) for m in modules]
    global_hooks = {name: getattr(_module_globals, name) for name in _GLOBAL_HOOKS}
    saved_global = {name: OrderedDict(d) for name, d in global_hooks.items() if d}
    try:
        for m in modules:
            for attr in _MODULE_HOOKS:
                if m.__dict__.get(attr):
                    m.__dict__[attr] = OrderedDict()
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.detach().clone()
            m.__dict__["training"] = False
        for name in saved_global:
            global_hooks[name].clear()
        with _force_eager():
            yield
    finally:
        for name, hooks in saved_global.items():
            global_hooks[name].clear()
            global_hooks[name].update(hooks)
        for m, attrs, buffers in saved:
            for key in [k for k in m._buffers if k not in buffers]:
                del m._buffers[key]
            m._buffers.update(buffers)
            for key in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[key]
            m.__dict__.update(attrs)


def _force_eager() -> contextlib.AbstractContextManager[Any]:
    """Compiled code runs as plain eager Python: no compilation, no recompilation."""
    compiler = getattr(torch, "compiler", None)
    set_stance = getattr(compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6: nothing to do for a model that is not compiled
        return contextlib.nullcontext()
    stance: contextlib.AbstractContextManager[Any] = set_stance("force_eager")
    return stance
