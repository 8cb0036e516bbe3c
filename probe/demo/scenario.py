"""The scenario ``rankguard demo`` trains, shipped with the package so the demo runs from an
installed wheel: the scenario's settings (``Scenario``, ``OptimConfig``, ``Schedule``, the
shared model size), the demo's failing run (:data:`DEMO`: the 100x learning-rate spike, which
only a rollback saves) and its healthy twin (:data:`CONTROL`), and the earlier demo's pair
(:data:`QK_LR_OVERFLOW`, which MSign saves, and its control).
``benchmarks/scenarios/catalog.py`` builds the rest of its catalog on these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from torch import nn

from .failure import FailureKind
from .model import ModelConfig

__all__ = [
    "CONTROL",
    "DEMO",
    "HEALTHY_FP16_ATTN_NOWD",
    "HEALTHY_PRELN",
    "LR_SPIKE",
    "QK_LR_OVERFLOW",
    "ModelSpec",
    "OptimConfig",
    "Scenario",
    "Schedule",
]

Role = Literal["failing", "healthy"]
Decay = Literal["constant", "cosine", "linear"]
OptimKind = Literal["adamw", "sgd", "lion"]


class ModelSpec(Protocol):
    """What a scenario's model is: a frozen description that builds the model. The GPT's
    :class:`ModelConfig` is one; the benchmarks' Llama (``benchmarks/scenarios/llama.py``)
    another."""

    @property
    def arch(self) -> str: ...

    @property
    def block_size(self) -> int: ...

    def build(self) -> nn.Module: ...


@dataclass(frozen=True)
class OptimConfig:
    """nanoGPT-style groups (decay on ≥2-D weights only; µP-style LR multipliers) for AdamW,
    SGD with momentum (``momentum``, Nesterov off) or Lion (``betas``: Lion's β1, β2)."""

    kind: OptimKind = "adamw"
    momentum: float = 0.9  # SGD only
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # None: no clipping (the norm is still measured)
    hidden_lr_mult: float = 1.0  # 2-D weights inside transformer.h (µP: 16× in MSign's setup)
    embed_lr_mult: float = 1.0  # wte/wpe/lm_head
    # Extra LR multiplier on the W_Q and W_K rows of every fused c_attn (on top of
    # hidden_lr_mult): a µP-style multiplier misapplied to the query/key projections.
    qk_lr_mult: float = 1.0
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)²) (Wortsman's mitigation)

    def __post_init__(self) -> None:
        if self.kind not in ("adamw", "sgd", "lion"):
            raise ValueError(f"kind must be adamw, sgd or lion, got {self.kind!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.qk_lr_mult <= 0:
            raise ValueError(f"qk_lr_mult must be positive, got {self.qk_lr_mult}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class Schedule:
    """LR multiplier over steps: linear warmup, then decay, times a ramp and an optional spike.

    ``ramp_to``: the post-warmup multiplier grows linearly from 1 to ``ramp_to`` at the last
    step (a run that gets hotter over time). ``spike_*``: steps [spike_start, spike_start +
    spike_len) run at ``spike_factor`` × the scheduled LR (an operator's mistake on resume);
    spike_len = 0 means the spike lasts to the end of the run.
    """

    warmup_steps: int = 50
    decay: Decay = "constant"
    min_lr_frac: float = 0.1
    ramp_to: float = 1.0
    spike_start: int | None = None
    spike_len: int = 0
    spike_factor: float = 1.0
    spike_ramp: int = 0  # steps over which the spike factor rises linearly from 1

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay not in ("constant", "cosine", "linear"):
            raise ValueError(f"decay must be constant, cosine or linear, got {self.decay!r}")
        if self.spike_start is not None and self.spike_start < 0:
            raise ValueError(f"spike_start must be >= 0 or None, got {self.spike_start}")
        if self.spike_len < 0:
            raise ValueError(f"spike_len must be >= 0, got {self.spike_len}")
        if self.spike_ramp < 0:
            raise ValueError(f"spike_ramp must be >= 0, got {self.spike_ramp}")

    def multiplier(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            m = (step + 1) / self.warmup_steps
        else:
            span = max(1, total_steps - self.warmup_steps)
            frac = min(1.0, (step - self.warmup_steps) / span)
            if self.decay == "cosine":
                m = self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))
            elif self.decay == "linear":
                m = 1.0 - (1.0 - self.min_lr_frac) * frac
            else:
                m = 1.0
            m *= 1.0 + (self.ramp_to - 1.0) * frac
        if self.spike_start is None or step < self.spike_start:
            return m
        if self.spike_len == 0 or step < self.spike_start + self.spike_len:
            into = step - self.spike_start + 1
            if self.spike_ramp > 0 and into < self.spike_ramp:
                m *= 1.0 + (self.spike_factor - 1.0) * into / self.spike_ramp
            else:
                m *= self.spike_factor
        return m


@dataclass(frozen=True)
class Scenario:
    """One training setting. ``family``: the group a leave-one-family-out analysis holds out
    together (a model, an optimizer and a kind of fault, with its healthy controls);
    ``arch``: the architecture the targets are judged on ("gpt", "llama")."""

    name: str
    role: Role
    mechanism: str
    model: ModelSpec
    optim: OptimConfig
    schedule: Schedule
    steps: int
    batch_size: int
    seq_len: int
    seeds: tuple[int, ...] = (0, 1, 2)
    expected: FailureKind | None = None  # what the unprotected failing run shows
    control: str | None = None  # healthy twin's name (failing scenarios only)
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    family: str = "custom"

    @property
    def arch(self) -> str:
        return self.model.arch

    def __post_init__(self) -> None:
        if self.role not in ("failing", "healthy"):
            raise ValueError(f"role must be 'failing' or 'healthy', got {self.role!r}")
        if self.role == "failing" and (self.expected is None or self.control is None):
            raise ValueError(f"failing scenario {self.name!r} needs expected and control")
        if self.role == "healthy" and self.expected is not None:
            raise ValueError(f"healthy scenario {self.name!r} must have expected=None")
        if self.seq_len > self.model.block_size:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds model.block_size={self.model.block_size}"
            )
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError(f"scenario {self.name!r} needs at least one seed")


# --- the calibrated catalog ------------------------------------------------------------------
# One model size for all scenarios (4 layers, d=64, 4 heads, seq 64, batch 16, 400 steps): about
# 0.05 s/step on one idle CPU thread with fp32 attention. Every knob not named in a scenario is
# shared with its control, so the only difference between twins is the mechanism.

STEPS = 400
BATCH_SIZE = 16
SEQ_LEN = 64
SEEDS = (0, 1, 2)

BASE_MODEL = ModelConfig(block_size=SEQ_LEN, n_layer=4, n_head=4, n_embd=64)
POST_LN_MODEL = replace(BASE_MODEL, norm_position="post")
FP16_ATTN_MODEL = replace(BASE_MODEL, attn_logit_dtype="float16")

# Safe optimizer: AdamW 1e-3, wd 0.1, no clipping (clipping at 1.0 turned a 30x spike into a
# silent degradation instead of an explosion).
SAFE_OPTIM = OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=None)
SAFE_SCHEDULE = Schedule(warmup_steps=50)
# LR grows linearly after a 20-step warmup from 1e-3 to 0.3 at the last step.
HOT_RAMP = Schedule(warmup_steps=20, ramp_to=300.0)
# 120 healthy steps at 1e-3, then the LR climbs linearly to 0.3 over 150 steps, holds until step
# 300 and drops back to 1e-3: a bounded hot window, so a run that survives it can recover.
LATE_HOT_WINDOW = Schedule(
    warmup_steps=50, spike_start=120, spike_factor=300.0, spike_ramp=150, spike_len=180
)
# No weight decay anywhere (µP recipes often drop it) and a 100-step warmup; the safe LR.
NO_DECAY_OPTIM = replace(SAFE_OPTIM, weight_decay=0.0)
LONG_WARMUP = Schedule(warmup_steps=100)


_SHARED: dict[str, Any] = {
    "steps": STEPS,
    "batch_size": BATCH_SIZE,
    "seq_len": SEQ_LEN,
    "seeds": SEEDS,
}


HEALTHY_FP16_ATTN_NOWD = Scenario(
    name="healthy_fp16_attn_nowd",
    family="gpt-fp16",
    role="healthy",
    mechanism="control: fp16 attention logits, no weight decay, 100-step warmup, safe LR",
    model=FP16_ATTN_MODEL,
    optim=NO_DECAY_OPTIM,
    schedule=LONG_WARMUP,
    **_SHARED,
)

QK_LR_OVERFLOW = Scenario(
    name="qk_lr_overflow",
    family="gpt-fp16",
    role="failing",
    mechanism="W_Q/W_K train at 100x the LR of the rest (a µP multiplier misapplied to "
    "the query/key projections), no weight decay, fp16 attention logits: the logits grow "
    "steadily from the start until q·k overflows fp16 and the loss is NaN",
    model=FP16_ATTN_MODEL,
    optim=replace(NO_DECAY_OPTIM, qk_lr_mult=100.0),
    schedule=LONG_WARMUP,
    expected=FailureKind.EXPLOSION,
    control="healthy_fp16_attn_nowd",
    notes="NaN at steps 238 / 232 (seeds 0 / 1); max logit > 50 from step 16, > 1e3 from "
    "step 81 / 76, ~1.2e4 at step 180-220; the trailing-25 loss is within 1.04x of the "
    "control at step 150 and 1.10x just before the NaN. Attention-weight MSign undoes it: "
    "every 10 steps while the logit > 1e3 (the default remediation, 28 MSigns) ends at "
    "1.08x / 1.075x the control, periodic every 10 steps from step 0 at 1.07x. "
    "sigma_1(W_Q) grows 0.8 -> 41 (control ~1.2); the stable rank of W_Q/W_K is already "
    "~3-4 by step 5, so the relative stable-rank rule never fires",
    **_SHARED,
)

HEALTHY_PRELN = Scenario(
    name="healthy_preln",
    family="gpt-adamw-lr",
    role="healthy",
    mechanism="control: pre-LN GPT at a safe LR",
    model=BASE_MODEL,
    optim=SAFE_OPTIM,
    schedule=SAFE_SCHEDULE,
    **_SHARED,
)

LR_SPIKE = Scenario(
    name="lr_spike",
    family="gpt-adamw-lr",
    role="failing",
    mechanism="100x LR spike at step 150 (resumed with 1e-1 instead of 1e-3), AdamW, no clipping",
    model=BASE_MODEL,
    optim=SAFE_OPTIM,
    schedule=replace(SAFE_SCHEDULE, spike_start=150, spike_factor=100.0),
    expected=FailureKind.EXPLOSION,
    control="healthy_preln",
    notes="the loss jumps above 2x its minimum 1-2 steps after the spike, then partly "
    "recovers; attention logits grow from ~5 to >1e3 afterwards. 30x exploded on 2 of 3 "
    "seeds (the third peaked at 1.7x), 100x on 3 of 3",
    **_SHARED,
)

# The demo: a run MSign alone cannot save (the explosion comes one step after the 100x
# update); the auto-recover profile rolls it back at the step the update lands.
DEMO = LR_SPIKE
CONTROL = HEALTHY_PRELN
