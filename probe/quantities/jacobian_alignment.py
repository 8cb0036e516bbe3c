"""Adjacent-block Jacobian alignment (MSign Def. 3.2, recipe papers.md §6.2).

For blocks f_ℓ: H^(ℓ−1) ↦ H^(ℓ) (whole block: attention, MLP, norms, residuals) on a small
fixed probe batch, J^(ℓ) is the (T·d)×(T·d) Jacobian of one sequence. Never materialised:

- u_ℓ = top left singular vector of J^(ℓ):  u ← normalize(J (Jᵀ u))   (vjp, then jvp)
- v_ℓ = top right singular vector of J^(ℓ): v ← normalize(Jᵀ (J v))   (jvp, then vjp)

and, per adjacent pair, a = |⟨v_{ℓ+1}, u_ℓ⟩| ∈ [0, 1] (``jacobian_alignment``, target
``"<block ℓ>-><block ℓ+1>"``), M_ℓ = σ₁(J^(ℓ)) (``jacobian_spectral_norm``, target the block)
and a·M_ℓ (``jacobian_alignment_gain``; > 1 is Thm 4.2's danger zone). A batch Jacobian is
block-diagonal over sequences, so each sequence is treated alone and the results averaged.

Block inputs come from a no-grad forward of the model on the probe batch with one-shot
pre-hooks on the blocks (which also capture extra args/kwargs such as masks). Blocks run in
eval mode (no dropout) with fp32 copies of their parameters, and attention uses the math SDPA
kernel, which supports forward-mode AD. Vectors are warm-started from the previous sample.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

from ..hooks import CallCapture
from .base import Output, Quantity, StepContext, Values, stack
from .spectral import start_vector

__all__ = ["BlockJacobian", "JacobianAlignment", "capture_block_inputs"]


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    # Flash/efficient SDPA kernels have no forward-mode AD; the math kernel does.
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the legacy switch
        with torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        ):
            yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


@contextlib.contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every submodule in eval mode, each one's own flag restored afterwards."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def capture_block_inputs(
    model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], batch: CallCapture
) -> dict[str, CallCapture]:
    """Runs ``model(*batch.args, **batch.kwargs)`` without grad, in eval mode, keeping each
    block's call (args, kwargs)."""
    seen: dict[str, CallCapture] = {}
    handles = []
    for name, block in blocks:

        def hook(
            mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name
        ) -> None:
            if name not in seen:
                seen[name] = CallCapture(tuple(args), dict(kwargs))

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode([model]):
            model(*batch.args, **batch.kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _hidden_slot(call: CallCapture) -> tuple[str, int | str]:
    """Where the hidden state sits: the first tensor positional argument, else the first
    tensor keyword argument."""
    for i, a in enumerate(call.args):
        if isinstance(a, Tensor) and a.is_floating_point():
            return ("arg", i)
    for k, a in call.kwargs.items():
        if isinstance(a, Tensor) and a.is_floating_point():
            return ("kwarg", k)
    raise ValueError("block call has no floating-point tensor input to differentiate")


def _one_sequence(value: Any, batch: int, s: int) -> Any:
    if isinstance(value, Tensor):
        return value[s : s + 1] if value.dim() >= 1 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_one_sequence(v, batch, s) for v in value)
    if isinstance(value, list):
        return [_one_sequence(v, batch, s) for v in value]
    if isinstance(value, dict):
        return {k: _one_sequence(v, batch, s) for k, v in value.items()}
    return value


class BlockJacobian:
    """The Jacobian of one block at one sequence's input, as matrix-free products."""

    def __init__(self, block: nn.Module, call: CallCapture, s: int) -> None:
        kind, slot = _hidden_slot(call)
        hidden = call.args[slot] if kind == "arg" else call.kwargs[slot]  # type: ignore[index]
        batch = int(hidden.shape[0])
        args = _one_sequence(call.args, batch, s)
        kwargs = _one_sequence(call.kwargs, batch, s)
        # fp32 copies of the block's parameters: math in fp32 whatever the model dtype
        params = {k: p.detach().to(torch.float32) for k, p in block.named_parameters()}

        def f(h: Tensor) -> Tensor:
            a, kw = list(args), dict(kwargs)
            if kind == "arg":
                a[slot] = h  # type: ignore[index]
            else:
                kw[slot] = h
            out = functional_call(block, params, tuple(a), kw)
            if isinstance(out, (tuple, list)):
                out = out[0]
            y: Tensor = out.to(torch.float32)
            return y

        self.f: Callable[[Tensor], Tensor] = f
        self.h = hidden[s : s + 1].detach().to(torch.float32)  # (1, T, d) or (1, d)
        result = vjp(f, self.h)
        self._vjp: Callable[[Tensor], tuple[Tensor, ...]] = result[1]
        self.out_shape = result[0].shape

    def jvp(self, w: Tensor) -> Tensor:
        """J w: input-space w -> output-space."""
        tangent: Tensor = jvp(self.f, (self.h,), (w,))[1]
        return tangent

    def vjp(self, u: Tensor) -> Tensor:
        """Jᵀ u: output-space u -> input-space (reuses the one recorded graph)."""
        cotangent: Tensor = self._vjp(u)[0]
        return cotangent


class JacobianAlignment(Quantity):
    """Emits ``jacobian_alignment``, ``jacobian_spectral_norm``, ``jacobian_alignment_gain``.

    Args:
        iterations: power iterations per vector once warm.
        cold_iterations: iterations without a warm vector (first sample, shape change).
    """

    name: ClassVar[str] = "jacobian_alignment"
    emits: ClassVar[tuple[str, ...]] = (
        "jacobian_alignment",
        "jacobian_spectral_norm",
        "jacobian_alignment_gain",
    )
    default_cadence: ClassVar[str] = "jacobian_every"

    def __init__(self, *, iterations: int = 3, cold_iterations: int = 20, **kwargs: Any):
        super().__init__(**kwargs)
        self.iterations = iterations
        self.cold_iterations = cold_iterations
        self._u: dict[str, Tensor] = {}  # "<block>#<seq>" -> left vector, output-space shape
        self._v: dict[str, Tensor] = {}  # "<block>#<seq>" -> right vector, input-space shape

    def _start(
        self, store: Mapping[str, Tensor], key: str, like: torch.Size, device: torch.device
    ) -> tuple[Tensor, int]:
        v = store.get(key)
        if v is None or v.shape != like:
            n = 1
            for d in like:
                n *= int(d)
            return start_vector(n, device).reshape(like), self.cold_iterations
        return v.to(device), self.iterations

    def left(self, jac: BlockJacobian, key: str) -> tuple[Tensor, Tensor]:
        """(u₁, σ₁) of J by u ← normalize(J Jᵀ u); σ₁ = ‖Jᵀ u‖."""
        u, n = self._start(self._u, key, jac.out_shape, jac.h.device)
        jtu = jac.vjp(u)
        for _ in range(n):
            u = _unit(jac.jvp(_unit(jtu)))
            jtu = jac.vjp(u)
        sigma = torch.linalg.vector_norm(jtu)
        self._u[key] = _warm(u, sigma)
        return u, sigma

    def right(self, jac: BlockJacobian, key: str) -> tuple[Tensor, Tensor]:
        """(v₁, σ₁) of J by v ← normalize(Jᵀ J v); σ₁ = ‖J v‖."""
        v, n = self._start(self._v, key, jac.h.shape, jac.h.device)
        jv = jac.jvp(v)
        for _ in range(n):
            v = _unit(jac.vjp(_unit(jv)))
            jv = jac.jvp(v)
        sigma = torch.linalg.vector_norm(jv)
        self._v[key] = _warm(v, sigma)
        return v, sigma

    def compute(self, ctx: StepContext) -> list[Output]:
        blocks = list(ctx.blocks)
        if len(blocks) < 2 or ctx.probe_batch is None:
            return []
        calls = capture_block_inputs(ctx.model, blocks, ctx.probe_batch)
        names = [n for n, _ in blocks]
        with warnings.catch_warnings(), _math_attention(), eval_mode([b for _, b in blocks]):
            # torch.func.jvp's first call scripts its decompositions with the deprecated
            # torch.jit.script (torch 2.13): torch's own notice, nothing the user can act on
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning
            )
            return self._compute(blocks, calls, names)

    def _compute(
        self,
        blocks: Sequence[tuple[str, nn.Module]],
        calls: Mapping[str, CallCapture],
        names: Sequence[str],
    ) -> list[Output]:
        first = calls.get(names[0])
        if first is None:
            return []
        kind, slot = _hidden_slot(first)
        hidden = first.args[slot] if kind == "arg" else first.kwargs[slot]  # type: ignore[index]
        n_seq = int(hidden.shape[0])
        sigma: dict[str, list[Tensor]] = {}
        align: dict[str, list[Tensor]] = {}
        for s in range(n_seq):
            jacs = {
                name: BlockJacobian(block, calls[name], s)
                for name, block in blocks
                if name in calls
            }
            for i, name in enumerate(names):
                jac = jacs.get(name)
                if jac is None:
                    continue
                key = f"{name}#{s}"
                nxt = jacs.get(names[i + 1]) if i + 1 < len(names) else None
                if nxt is not None and nxt.h.shape == jac.out_shape:
                    u, m = self.left(jac, key)
                    v, _ = self.right(nxt, f"{names[i + 1]}#{s}")
                    align.setdefault(f"{name}->{names[i + 1]}", []).append(torch.sum(u * v).abs())
                    sigma.setdefault(name, []).append(m)
                elif i > 0 and f"{names[i - 1]}->{name}" in align:
                    # the last block: σ₁ from its right vector, computed for the pair above
                    sigma.setdefault(name, []).append(
                        torch.linalg.vector_norm(jac.jvp(self._v[key].to(jac.h.device)))
                    )
                else:
                    _, m = self.right(jac, key)
                    sigma.setdefault(name, []).append(m)
        m_mean = {k: torch.stack(v).mean() for k, v in sigma.items()}
        a_mean = {k: torch.stack(v).mean() for k, v in align.items()}
        pairs = tuple(a_mean)
        gains = [a_mean[p] * m_mean[p.split("->", 1)[0]] for p in pairs]
        with torch.no_grad():
            return [
                Values("jacobian_alignment", pairs, stack([a_mean[p].detach() for p in pairs])),
                Values(
                    "jacobian_spectral_norm",
                    tuple(m_mean),
                    stack([m.detach() for m in m_mean.values()]),
                ),
                Values("jacobian_alignment_gain", pairs, stack([g.detach() for g in gains])),
            ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "u": {k: v.clone() for k, v in self._u.items()},
            "v": {k: v.clone() for k, v in self._v.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._u = {k: v.detach().clone() for k, v in state.get("u", {}).items()}
        self._v = {k: v.detach().clone() for k, v in state.get("v", {}).items()}


def _warm(vector: Tensor, sigma: Tensor) -> Tensor:
    """The warm start kept for the next sample: ``vector``, or the start vector where the
    Jacobian sent it to zero (σ₁ = 0: a block whose output does not depend on its input on
    the probe batch, e.g. a zero-initialised non-residual block). From a zero vector no later
    iteration could leave, and σ₁ and the alignment would read 0 after the block trains, as
    ``PowerIteration.remember`` avoids for weights; chosen on the device (no sync)."""
    start = start_vector(vector.numel(), vector.device).reshape(vector.shape)
    return torch.where(sigma > 0, vector.detach(), start)


def _unit(x: Tensor) -> Tensor:
    # normalise over every element of a (1, T, d) vector
    return F.normalize(x.reshape(-1), dim=0).reshape(x.shape).detach()
