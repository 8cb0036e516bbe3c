"""The scenario catalog: failing runs (each with a distinct mechanism) and their healthy twins.

A healthy control is the same model, data and seeds at a safe setting; silent degradation
is judged against it (``failure.classify``). Settings were calibrated on a 2-core CPU; see
``calibration_notes.json`` for the measured runs behind each entry. The settings, the demo's
scenario and its control (and the earlier demo's pair) live in the package
(``rankguard.probe.demo.scenario``): the installed ``rankguard demo`` trains them.
"""

from __future__ import annotations

from dataclasses import replace

from rankguard.probe.demo.failure import FailureKind
from rankguard.probe.demo.scenario import (
    _SHARED,
    BASE_MODEL,
    FP16_ATTN_MODEL,
    HEALTHY_FP16_ATTN_NOWD,
    HEALTHY_PRELN,
    HOT_RAMP,
    LATE_HOT_WINDOW,
    LR_SPIKE,
    POST_LN_MODEL,
    QK_LR_OVERFLOW,
    SAFE_OPTIM,
    SAFE_SCHEDULE,
    OptimConfig,
    Scenario,
    Schedule,
)

__all__ = ["OptimConfig", "Scenario", "Schedule", "failing", "get", "healthy"]

_ALL = [
    # Healthy controls -----------------------------------------------------------------------
    HEALTHY_PRELN,
    Scenario(
        name="healthy_postln",
        role="healthy",
        mechanism="control: post-LN GPT at a safe LR with warmup",
        model=POST_LN_MODEL,
        optim=SAFE_OPTIM,
        schedule=SAFE_SCHEDULE,
        **_SHARED,
    ),
    Scenario(
        name="healthy_fp16_attn",
        role="healthy",
        mechanism="control: fp16 attention logits at a safe LR",
        model=FP16_ATTN_MODEL,
        optim=SAFE_OPTIM,
        schedule=SAFE_SCHEDULE,
        **_SHARED,
    ),
    HEALTHY_FP16_ATTN_NOWD,
    # Failing scenarios ----------------------------------------------------------------------
    LR_SPIKE,
    Scenario(
        name="attn_logit_growth",
        role="failing",
        mechanism="pre-LN without qk-layernorm under an LR ramp to 0.3: attention logits "
        "pass 1e4 and the loss stalls far above the control",
        model=BASE_MODEL,
        optim=SAFE_OPTIM,
        schedule=HOT_RAMP,
        expected=FailureKind.SILENT_DEGRADATION,
        control="healthy_preln",
        notes="no explosion even at LR 0.3 and logits ~7e4: the loss stalls at ~3.1 vs the "
        "control's ~2.3 (+35%); logits pass 1e3 near step 110-150. Clipping at 1.0 changes "
        "nothing (3.07 on seed 0)",
        **_SHARED,
    ),
    Scenario(
        name="postln_no_warmup",
        role="failing",
        mechanism="post-LN at LR 1e-2 with no warmup",
        model=POST_LN_MODEL,
        optim=replace(SAFE_OPTIM, lr=1e-2),
        schedule=Schedule(warmup_steps=0),
        expected=FailureKind.SILENT_DEGRADATION,
        control="healthy_postln",
        notes="stalls at ~3.1 from step ~50 on (control ~2.37); attention logits stay < 100, "
        "so this failure is not announced by logit growth. It is a representation collapse: "
        "the layers' inputs have SR(Z) ~ 1.00 from step 5 on (every token along one "
        "direction); MSign on every 2-D weight, repeated while it lasts, lifts it for good",
        **_SHARED,
    ),
    Scenario(
        name="fp16_attn_overflow",
        role="failing",
        mechanism="fp16 attention logits without qk-layernorm; after 120 healthy steps the "
        "LR climbs to 0.3 (steps 120-300): logits grow past 1e3, then q·k overflows fp16 and "
        "the loss is NaN",
        model=FP16_ATTN_MODEL,
        optim=SAFE_OPTIM,
        schedule=LATE_HOT_WINDOW,
        expected=FailureKind.EXPLOSION,
        control="healthy_fp16_attn",
        notes="NaN at steps 243-251 on seeds 0-2; the max logit passes 1e3 ~70-90 steps "
        "earlier (max |q·k| hits 65504 at logit ~16k with d_h = 16). The loss is already "
        "~20% above the control before the NaN",
        **_SHARED,
    ),
    QK_LR_OVERFLOW,
]

SCENARIOS: dict[str, Scenario] = {s.name: s for s in _ALL}


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {sorted(SCENARIOS)}") from None


def failing() -> list[Scenario]:
    return [s for s in SCENARIOS.values() if s.role == "failing"]


def healthy() -> list[Scenario]:
    return [s for s in SCENARIOS.values() if s.role == "healthy"]
