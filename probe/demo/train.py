"""The training loop shared by every scenario, with hook points for probes and interventions.

``train(scenario, seed)`` trains on CPU (or ``device``), records per-step loss, pre-clip
gradient norm, LR and max attention logit, and calls each callback's ``on_before_step`` (after
backward, before clipping and ``optimizer.step()``), ``on_after_backward`` (the same point, with
the loss) and ``on_step`` (after ``optimizer.step()``; a probe's ``probe.step(loss)`` goes
there).

Rollback: an ``on_step`` that returns an int (a probe that restored an earlier state) makes the
loop continue from that training step: the schedule resumes there, the per-step records are cut
back to it (they are the trajectory of the model that exists), and the data keeps coming fresh
(the batches after the restored state are skipped, never replayed). ``RunResult.wall_losses``
keeps every loss in the order it was computed, rolled-back steps included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .data import ByteCorpus
from .failure import Failure, classify, find_explosion, smoothed_final_loss
from .model import GPT
from .optim import Lion
from .scenario import Scenario

__all__ = [
    "RunResult",
    "StepCallback",
    "build_model",
    "build_optimizer",
    "evaluate",
    "logits_of",
    "summarize",
    "train",
]


class StepCallback(Protocol):
    def on_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor
    ) -> int | None: ...


@dataclass
class RunResult:
    scenario: str
    seed: int
    steps_run: int
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # global L2 norm before clipping
    lrs: list[float] = field(default_factory=list)  # base-group LR used at each step
    attn_logit_max: list[float] = field(default_factory=list)  # max over blocks, per step
    val_loss: float = math.nan
    wall_time_s: float = 0.0
    explosion: Failure | None = None  # explosion only; silent degradation needs the control
    wall_losses: list[float] = field(default_factory=list)  # every loss, rollbacks included
    rollbacks: list[tuple[int, int]] = field(default_factory=list)  # (at step, resumed at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "steps_run": self.steps_run,
            "wall_time_s": round(self.wall_time_s, 2),
            "val_loss": self.val_loss,
            "explosion_step": None if self.explosion is None else self.explosion.step,
            "losses": self.losses,
            "grad_norms": self.grad_norms,
            "lrs": self.lrs,
            "attn_logit_max": self.attn_logit_max,
        }


def build_model(scenario: Scenario) -> nn.Module:
    """The scenario's model, built by its spec (the GPT of ``model.py``, or another)."""
    return scenario.model.build()


def logits_of(output: Any) -> torch.Tensor:
    """The logits (B, T, V) of a forward: the GPT returns them, an HF model an output object."""
    return output if isinstance(output, torch.Tensor) else output.logits


# Parameter-name prefixes of the hidden blocks and of the embeddings/head, per architecture.
_HIDDEN = ("transformer.h.", "model.layers.")
_EMBED = ("transformer.wte", "transformer.wpe", "lm_head", "model.embed_tokens")


def build_optimizer(model: nn.Module, scenario: Scenario) -> torch.optim.Optimizer:
    """Groups by (decay?, lr_mult): decay on ≥2-D weights; µP multipliers per group. AdamW, SGD
    with momentum or Lion, as ``scenario.optim.kind`` says."""
    oc = scenario.optim
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        decay = p.ndim >= 2
        if name.startswith(_HIDDEN) and p.ndim >= 2:
            mult = oc.hidden_lr_mult
        elif name.startswith(_EMBED):
            mult = oc.embed_lr_mult
        else:
            mult = 1.0
        groups.setdefault((decay, mult), []).append(p)
    param_groups = [
        {
            "params": ps,
            "weight_decay": oc.weight_decay if decay else 0.0,
            "lr_mult": mult,
            "lr": oc.lr * mult,
        }
        for (decay, mult), ps in groups.items()
    ]
    if oc.kind == "sgd":
        return torch.optim.SGD(param_groups, lr=oc.lr, momentum=oc.momentum)
    if oc.kind == "lion":
        return Lion(param_groups, lr=oc.lr, betas=oc.betas)
    return torch.optim.AdamW(param_groups, lr=oc.lr, betas=oc.betas, eps=oc.eps)


class QKRowLR:
    """Multiplies the AdamW update of the W_Q/W_K rows of each fused ``c_attn`` by ``mult``.

    A fused (3C, C) weight is one parameter, so a param group cannot give its rows their own
    LR, and scaling gradients does nothing under Adam. AdamW's whole step (decoupled decay
    included) is proportional to the LR, so rescaling the step of those rows after
    ``optimizer.step()`` is the same as running them at ``mult`` × the LR.
    """

    def __init__(self, model: GPT, mult: float) -> None:
        n_embd = model.config.n_embd
        self.mult = mult
        self.rows = [block.attn.c_attn.weight for block in model.blocks]
        self.qk = slice(0, 2 * n_embd)
        self.before: list[torch.Tensor] = []

    @torch.no_grad()
    def snapshot(self) -> None:
        self.before = [w[self.qk].clone() for w in self.rows]

    @torch.no_grad()
    def rescale(self) -> None:
        for w, old in zip(self.rows, self.before, strict=True):
            new = w[self.qk]
            new.copy_(old + self.mult * (new - old))


@torch.no_grad()
def evaluate(
    model: nn.Module, corpus: ByteCorpus, scenario: Scenario, seed: int, batches: int = 4
) -> float:
    gen = torch.Generator().manual_seed(10_000 + seed)
    device = next(model.parameters()).device
    total = 0.0
    for _ in range(batches):
        x, y = corpus.batch("val", scenario.batch_size, scenario.seq_len, gen)
        logits = logits_of(model(x.to(device)))
        total += float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()))
    return total / batches


def train(
    scenario: Scenario,
    seed: int,
    *,
    callbacks: Sequence[object] = (),
    max_steps: int | None = None,
    stop_after_explosion: int | None = None,
    corpus: ByteCorpus | None = None,
    device: str | torch.device = "cpu",
    evaluate_at_end: bool = True,
) -> RunResult:
    """Train ``scenario`` with ``seed``; deterministic given (scenario, seed) on one machine.

    ``stop_after_explosion``: stop this many steps after the first explosion (None: run on).
    A non-finite loss always ends the run after that step's callbacks (NaN does not heal).
    """
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"max_steps must be positive or None, got {max_steps}")
    corpus = corpus if corpus is not None else ByteCorpus.load()
    torch.manual_seed(seed)
    model = build_model(scenario).to(device)
    optimizer = build_optimizer(model, scenario)
    gen = torch.Generator().manual_seed(seed)
    total = scenario.steps
    steps = total if max_steps is None else min(total, max_steps)
    oc = scenario.optim
    params = [p for p in model.parameters() if p.requires_grad]
    clip = oc.grad_clip if oc.grad_clip is not None else math.inf
    result = RunResult(scenario=scenario.name, seed=seed, steps_run=0)
    if oc.qk_lr_mult != 1.0 and not isinstance(model, GPT):
        raise ValueError(f"qk_lr_mult needs the GPT's fused c_attn; {scenario.name} is not one")
    qk_lr = (
        QKRowLR(model, oc.qk_lr_mult) if isinstance(model, GPT) and oc.qk_lr_mult != 1.0 else None
    )
    t0 = time.perf_counter()
    model.train()
    step = 0
    batches = 0
    while step < steps:
        if batches >= 3 * steps:  # rollbacks could otherwise loop forever
            break
        batches += 1
        mult = scenario.schedule.multiplier(step, total)
        for group in optimizer.param_groups:
            group["lr"] = oc.lr * mult * group["lr_mult"]
        x, y = corpus.batch("train", scenario.batch_size, scenario.seq_len, gen)
        logits = logits_of(model(x.to(device)))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
        objective = loss
        if oc.z_loss > 0:
            objective = loss + oc.z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()  # type: ignore[no-untyped-call]
        for cb in callbacks:
            before = getattr(cb, "on_before_step", None)
            if before is not None:
                before(step, model, optimizer)
            # a monitor that reads the gradients with the loss (trainscope's scope.step)
            after_backward = getattr(cb, "on_after_backward", None)
            if after_backward is not None:
                after_backward(step, model, optimizer, loss.detach())
        # clip_grad_norm_ returns the pre-clip norm; with max_norm=inf it only measures.
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if qk_lr is not None:
            qk_lr.snapshot()
        optimizer.step()
        if qk_lr is not None:
            qk_lr.rescale()
        loss_value = float(loss.detach())
        result.losses.append(loss_value)
        result.wall_losses.append(loss_value)
        result.grad_norms.append(gnorm)
        result.lrs.append(oc.lr * mult)
        # the GPT records its attention logits; for other models the probe's are the record
        logit_max = model.attention_logit_max() if isinstance(model, GPT) else []
        result.attn_logit_max.append(max(logit_max) if logit_max else math.nan)
        result.steps_run = step + 1
        resume: int | None = None
        for cb in callbacks:
            on_step = getattr(cb, "on_step", None)
            if on_step is not None:
                back = on_step(step, model, optimizer, loss.detach())
                resume = back if isinstance(back, int) else resume
        if resume is not None and resume <= step:
            result.rollbacks.append((step, resume))
            for records in (result.losses, result.grad_norms, result.lrs, result.attn_logit_max):
                del records[resume:]
            result.steps_run = step = resume
            result.explosion = None
            continue
        step += 1
        if not math.isfinite(loss_value):
            break
        if stop_after_explosion is not None and result.explosion is None:
            result.explosion = find_explosion(result.losses)
        if (
            stop_after_explosion is not None
            and result.explosion is not None
            and step - 1 >= result.explosion.step + stop_after_explosion
        ):
            break
    result.explosion = find_explosion(result.losses)
    if evaluate_at_end and all(math.isfinite(v) for v in result.losses):
        model.eval()
        result.val_loss = evaluate(model, corpus, scenario, seed)
    result.wall_time_s = time.perf_counter() - t0
    return result


def summarize(result: RunResult, control: RunResult | None = None) -> dict[str, Any]:
    """A compact record of one run: failure (vs. the control when given), losses, logits."""
    fail = classify(result.losses, None if control is None else control.losses)
    finite_logits = [v for v in result.attn_logit_max if math.isfinite(v)]
    return {
        "scenario": result.scenario,
        "seed": result.seed,
        "steps_run": result.steps_run,
        "wall_time_s": round(result.wall_time_s, 1),
        "failure_kind": None if fail is None else fail.kind.value,
        "failure_step": None if fail is None else fail.step,
        "final_smoothed_loss": smoothed_final_loss(result.losses),
        "control_final_smoothed_loss": (
            None if control is None else smoothed_final_loss(control.losses)
        ),
        "val_loss": result.val_loss,
        "max_attn_logit": max(finite_logits) if finite_logits else None,
    }
