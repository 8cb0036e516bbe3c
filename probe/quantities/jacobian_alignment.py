"""Adjacent-block Jacobian alignment (MSign Def. 3.2, recipe papers.md §6.2).

For blocks f_ℓ: H^(ℓ−1) ↦ H^(ℓ) (whole block: attention, MLP, norms, residuals) on a small
probe batch, J^(ℓ) is the (T·d)×(T·d) Jacobian of one sequence. Never materialised:

- u_ℓ = top left singular vector of J^(ℓ):  u ← normalize(J (Jᵀ u))   (vjp, then jvp)
- v_ℓ = top right singular vector of J^(ℓ) = Jᵀu_ℓ/σ₁, from the same iteration

and, per adjacent pair, a = |⟨v_{ℓ+1}, u_ℓ⟩| ∈ [0, 1] (``jacobian_alignment``, target
``"<block ℓ>-><block ℓ+1>"``), M_ℓ = σ₁(J^(ℓ)) (``jacobian_spectral_norm``, target the block),
a·M_ℓ (``jacobian_alignment_gain``; > 1 is Thm 4.2's danger zone) and the relative residual
‖J v − σ u‖/σ of the block's estimates (``jacobian_residual``: a value above the tolerance
says the others did not converge). A batch Jacobian is block-diagonal over sequences, so each
sequence is treated alone and the results averaged.

Block inputs: each block's call (args, kwargs: masks, rotary tables; never a KV cache) is
captured on the sampled step where the blocks are really called, whatever wraps the model (a
LightningModule, DDP, a compiled wrapper). On the first sample the probe checks that the
blocks form a chain (block ℓ's output, recomputed, is block ℓ+1's input). Then that first
capture is a fixed probe batch (:attr:`JacobianAlignment.chain`): later samples recompute the
inputs of blocks ℓ ≥ 1 from it with the current weights, in eval mode, so successive samples
differ by the weights alone and the warm vectors stay good. Otherwise (something between the
blocks) each sample uses its own step's captured inputs. A ``probe_batch`` given to the probe
is replayed through the model instead. Every forward here is the probe's own
(:func:`~..replay.invisible`): no user hook fires, no buffer changes, blocks run in eval mode
with fp32 copies of their parameters, and attention uses the math SDPA kernel, which has
forward-mode AD and double backward. A block with an op lacking forward-mode AD (the grouped
GEMMs of MoE experts) gets J w by reverse over reverse instead.

Power iteration: an independent random start vector per block and sequence (a seeded
generator: reproducible, never one vector for all). The first sample (no warm vector) is
iterated until the residual ≤ ``tolerance`` (checked every ``_CHECK_EVERY`` iterations, one
host sync each) or ``cold_iterations``; later samples start from the previous vector and run
``iterations`` (no host sync). The residual is reported every time, so an estimate that did
not converge is visible.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

from ..hooks import CallCapture
from ..replay import eager, invisible, stateless
from .base import Output, Quantity, StepContext, Values, stack

__all__ = ["BlockJacobian", "JacobianAlignment", "replay_block_calls"]

_CHECK_EVERY = 5  # iterations between convergence checks (each is one host sync)
# Block ℓ's output recomputed in eval mode with the current weights vs block ℓ+1's input as
# captured in the training forward (before the optimizer step): an optimizer step moves a
# block's output by far less; something between the blocks (a norm, a projection) by far more.
_CHAIN_RTOL = 5e-2


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


def replay_block_calls(
    model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], batch: CallCapture
) -> dict[str, CallCapture]:
    """Runs the model on a given probe batch (the probe's own forward: invisible, no grad),
    keeping each block's call without its KV cache."""
    seen: dict[str, CallCapture] = {}
    with invisible([model]), torch.no_grad():
        # registered inside: the user's hooks are swapped out, these are dropped with them
        for name, block in blocks:

            def hook(
                mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name
            ) -> None:
                if name not in seen:
                    seen[name] = CallCapture.of(args, kwargs, int(1e9))

            block.register_forward_pre_hook(hook, with_kwargs=True)
        eager(model)(*batch.args, **batch.kwargs)
    return seen


def _hidden_slot(call: CallCapture) -> tuple[str, int | str]:
    """Where the hidden state sits: the first floating tensor positional argument, else the
    first floating tensor keyword argument."""
    for i, a in enumerate(call.args):
        if isinstance(a, Tensor) and a.is_floating_point():
            return ("arg", i)
    for k, a in call.kwargs.items():
        if isinstance(a, Tensor) and a.is_floating_point():
            return ("kwarg", k)
    raise ValueError("block call has no floating-point tensor input to differentiate")


def _hidden(call: CallCapture) -> Tensor:
    kind, slot = _hidden_slot(call)
    value = call.args[slot] if kind == "arg" else call.kwargs[slot]  # type: ignore[index]
    assert isinstance(value, Tensor)
    return value


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


def _first(out: Any) -> Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise ValueError(f"block output is {type(out).__name__}, not a tensor")
    return out


class BlockJacobian:
    """The Jacobian of one block at one sequence's input, as matrix-free products.

    ``hidden``: the (1, T, d) input to use instead of the captured one (a recomputed chain).
    """

    def __init__(
        self, block: nn.Module, call: CallCapture, s: int, hidden: Tensor | None = None
    ) -> None:
        _, slot = _hidden_slot(call)
        captured = _hidden(call)
        batch = int(captured.shape[0])
        args, kwargs = stateless(
            _one_sequence(call.args, batch, s), _one_sequence(call.kwargs, batch, s)
        )
        # fp32 copies of the block's parameters: math in fp32 whatever the model dtype
        params = {k: p.detach().to(torch.float32) for k, p in block.named_parameters()}
        buffers = dict(block.named_buffers())

        def f(h: Tensor) -> Tensor:
            a, kw = list(args), dict(kwargs)
            if isinstance(slot, int):
                a[slot] = h
            else:
                kw[slot] = h
            # buffers copied inside the transform: a forward that updates one in place (a
            # running statistic) mutates its own copy, which torch.func allows
            state = {**params, **{k: b.clone() for k, b in buffers.items()}}
            return _first(functional_call(block, state, tuple(a), kw)).to(torch.float32)

        self.f: Callable[[Tensor], Tensor] = f
        h = captured[s : s + 1] if hidden is None else hidden
        self.h = h.detach().to(torch.float32)  # (1, T, d) or (1, d)
        output, self._vjp = vjp(f, self.h)[:2]
        self.output = output.detach()  # f(h): the next block's input in a chain
        self.out_shape = output.shape
        self.forward_ad = True

    def jvp(self, w: Tensor) -> Tensor:
        """J w: input-space w -> output-space. Forward-mode AD where every op of the block
        has it; otherwise (the grouped GEMMs of MoE experts) reverse over reverse: J w is
        the vjp of the linear map u ↦ Jᵀu, at any u."""
        if self.forward_ad:
            try:
                tangent: Tensor = jvp(self.f, (self.h,), (w,))[1]
                return tangent
            except (NotImplementedError, RuntimeError) as exc:
                if "forward AD" not in str(exc):
                    raise
                self.forward_ad = False
        zeros = torch.zeros(self.out_shape, device=self.h.device)
        via_vjp: Tensor = vjp(lambda u: self._vjp(u)[0], zeros)[1](w)[0]
        return via_vjp

    def vjp(self, u: Tensor) -> Tensor:
        """Jᵀ u: output-space u -> input-space (reuses the one recorded graph)."""
        cotangent: Tensor = self._vjp(u)[0]
        return cotangent


class JacobianAlignment(Quantity):
    """Emits ``jacobian_alignment``, ``jacobian_spectral_norm``, ``jacobian_alignment_gain``
    and ``jacobian_residual``.

    Args:
        iterations: power iterations per vector, at least, once warm.
        cold_iterations: the most iterations per vector.
        tolerance: the relative residual ‖J v − σ u‖/σ at which iterating stops.
        seed: seeds the random start vectors.
    """

    name: ClassVar[str] = "jacobian_alignment"
    emits: ClassVar[tuple[str, ...]] = (
        "jacobian_alignment",
        "jacobian_spectral_norm",
        "jacobian_alignment_gain",
        "jacobian_residual",
    )
    default_cadence: ClassVar[str] = "jacobian_every"
    needs_blocks: ClassVar[bool] = True

    def __init__(
        self,
        *,
        iterations: int = 3,
        cold_iterations: int = 100,
        tolerance: float = 1e-3,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.iterations = iterations
        self.cold_iterations = cold_iterations
        self.tolerance = tolerance
        self.seed = seed
        self._u: dict[str, Tensor] = {}  # "<block>#<seq>" -> left vector, output-space shape
        self._fixed: dict[str, CallCapture] | None = None  # the chain's probe batch
        self.chain: bool | None = None
        """Whether the blocks' inputs are recomputed from a fixed first capture (None: not
        decided yet; False: each sample uses its own step's captured inputs)."""

    # -- power iteration ---------------------------------------------------------------------

    def _start(self, key: str, like: torch.Size, device: torch.device) -> Tensor:
        """A random unit vector of shape ``like``, reproducible per key (never shared)."""
        g = torch.Generator(device=device).manual_seed(self.seed + zlib.crc32(key.encode()))
        return _unit(torch.randn(like, generator=g, device=device))

    def top(self, jac: BlockJacobian, key: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(u₁, σ₁, v₁, residual) of J from one power iteration on the left vector,
        u ← normalize(J Jᵀ u): each step's w = Jᵀu gives σ = ‖w‖ and v = w/σ too, and the
        residual ‖J v − σ u‖/σ measures how far (u, σ, v) is from a singular triplet."""
        warm = self._u.get(key)
        cold = warm is None or warm.shape != jac.out_shape
        device = jac.h.device
        u = self._start(key, jac.out_shape, device) if cold else warm.to(device)  # type: ignore[union-attr]
        # cold (first sample, new shape): to the tolerance; warm: the fixed, cheap number of
        # iterations, no host sync, the residual reported either way
        least = _CHECK_EVERY if cold else self.iterations
        most = max(self.cold_iterations, least) if cold else self.iterations
        sigma = residual = torch.zeros((), device=device)
        v = torch.zeros(jac.h.shape, device=device)
        for i in range(most):
            w = jac.vjp(u)  # Jᵀu
            sigma = torch.linalg.vector_norm(w)
            v = w / sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
            jv = jac.jvp(v)
            residual = torch.linalg.vector_norm(jv - sigma * u) / sigma.clamp_min(1e-30)
            u = _unit(jv)
            done = i + 1 >= least and (i + 1 - least) % _CHECK_EVERY == 0
            if done and float(residual) <= self.tolerance:  # host sync: Jacobian steps only
                break
        # a zero Jacobian sends u to 0, from which no later sample could leave: keep the start
        self._u[key] = torch.where(sigma > 0, u, self._start(key, jac.out_shape, device))
        return u, sigma, v, torch.where(sigma > 0, residual, torch.zeros_like(residual))

    # -- where the blocks' inputs come from --------------------------------------------------

    def block_calls(self, ctx: StepContext) -> tuple[dict[str, CallCapture], bool] | None:
        """Each block's call for this sample, and whether the blocks' inputs are to be
        recomputed as a chain from the first one's (None: nothing was captured)."""
        blocks = list(ctx.blocks)
        if ctx.probe_batch is not None:
            return replay_block_calls(ctx.model, blocks, ctx.probe_batch), False
        captured = dict(ctx.captures.blocks)
        if self.chain is None and all(n in captured for n, _ in blocks):
            self.chain = _is_chain(blocks, captured)
            if self.chain:
                self._fixed = captured
        if self.chain and self._fixed is not None:
            return self._fixed, True
        return (captured, False) if captured else None

    def compute(self, ctx: StepContext) -> list[Output]:
        blocks = list(ctx.blocks)
        if len(blocks) < 2:
            return []
        found = self.block_calls(ctx)
        if found is None or blocks[0][0] not in found[0]:
            if ctx.captures.inputs or ctx.captures.calls:  # the model ran, its blocks did not
                ctx.unavailable(
                    "jacobian_alignment",
                    "the blocks were not called during the sampled step's forward (pass "
                    "blocks= or probe_batch=)",
                )
            return []  # else no forward since the probe was attached: nothing to say yet
        calls, chain = found
        with (
            warnings.catch_warnings(),
            _math_attention(),
            invisible([b for _, b in blocks]),
        ):
            # torch.func.jvp's first call scripts its decompositions with the deprecated
            # torch.jit.script (torch 2.13): torch's own notice, nothing the user can act on
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning
            )
            return self._compute(blocks, calls, chain)

    def _compute(
        self,
        blocks: Sequence[tuple[str, nn.Module]],
        calls: Mapping[str, CallCapture],
        chain: bool,
    ) -> list[Output]:
        names = [n for n, _ in blocks]
        n_seq = int(_hidden(calls[names[0]]).shape[0])
        sigma: dict[str, list[Tensor]] = {}
        align: dict[str, list[Tensor]] = {}
        residual: dict[str, list[Tensor]] = {}
        for s in range(n_seq):
            hidden: Tensor | None = None
            tops: dict[str, tuple[Tensor, Tensor, Tensor, Tensor, torch.Size]] = {}
            for name, block in blocks:
                if name not in calls:
                    break
                jac = BlockJacobian(block, calls[name], s, hidden if chain else None)
                hidden = jac.output
                u, m, v, r = self.top(jac, f"{name}#{s}")
                tops[name] = (u, m, v, r, jac.h.shape)
                sigma.setdefault(name, []).append(m)
                residual.setdefault(name, []).append(r)
            for a, b in itertools.pairwise(names):
                if a in tops and b in tops and tops[a][0].shape == tops[b][4]:
                    cosine = torch.sum(tops[a][0] * tops[b][2]).abs()  # |⟨u₁(J_a), v₁(J_b)⟩|
                    align.setdefault(f"{a}->{b}", []).append(cosine)
        return self._outputs(sigma, align, residual)

    def _outputs(
        self,
        sigma: Mapping[str, list[Tensor]],
        align: Mapping[str, list[Tensor]],
        residual: Mapping[str, list[Tensor]],
    ) -> list[Output]:
        m_mean = {k: torch.stack(v).mean() for k, v in sigma.items()}
        a_mean = {k: torch.stack(v).mean() for k, v in align.items()}
        r_max = {k: torch.stack(v).amax() for k, v in residual.items()}
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
                Values("jacobian_residual", tuple(r_max), stack(list(r_max.values()))),
            ]

    def state_dict(self) -> dict[str, Any]:
        return {"u": {k: v.clone() for k, v in self._u.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._u = {k: v.detach().clone() for k, v in state.get("u", {}).items()}


def _is_chain(blocks: Sequence[tuple[str, nn.Module]], calls: Mapping[str, CallCapture]) -> bool:
    """Whether each block's output, recomputed from its captured call (same autocast, eval
    mode), is the next block's captured input within ``_CHAIN_RTOL`` (relative norm; one host
    sync, first sample only)."""
    worst = torch.zeros(())
    with invisible([b for _, b in blocks]), torch.no_grad():
        for (name, block), (next_name, _) in itertools.pairwise(blocks):
            call, nxt = calls[name], _hidden(calls[next_name])
            args, kwargs = stateless(call.args, call.kwargs)
            cast = call.autocast.context() if call.autocast else contextlib.nullcontext()
            with cast:
                out = _first(block(*args, **kwargs)).float()
            if out.shape != nxt.shape:
                return False
            ref = nxt.float()
            err = torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(
                1e-12
            )
            worst = torch.maximum(worst, err.cpu())
    return bool(worst <= _CHAIN_RTOL)


def _unit(x: Tensor) -> Tensor:
    # normalise over every element of a (1, T, d) vector
    return F.normalize(x.reshape(-1), dim=0).reshape(x.shape).detach()
