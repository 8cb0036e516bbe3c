"""Interventions: MSign (stable-rank restoration) and PSS (spectrum smoothing) on the weights,
a learning-rate backoff on the optimizer (:class:`LearningRateScale`), and QK-Clip
(per-head query/key rescaling, :func:`apply_qk_clip`).

Functions rewrite the given :class:`~rankguard.probe.targets.WeightTarget` matrices in place
(fp32 math, written back in the parameter dtype) and return an :class:`InterventionResult`
with before/after statistics per matrix. Idempotence by command id is the caller's job.

    from rankguard.probe.interventions import MSign, Snapshot, apply_msign, apply_pss

    snapshot = Snapshot.take(targets)           # optional undo, kept on the CPU
    result = apply_msign(targets, engine="svd")  # or "newton_schulz"
    snapshot.restore()                            # bit-identical undo
    optimizer = MSign(torch.optim.AdamW(...), targets, period=100)  # the paper's optimizer
"""

from __future__ import annotations

from .lr_scale import LearningRateScale
from .msign import Engine, apply_msign, default_engine, msign_newton_schulz, msign_svd
from .periodic import MSign
from .polar import DEFAULT_STEPS, polar_factor, steps_for_floor
from .pss import PSSVariant, apply_pss, smooth_singular_values
from .qk_clip import QKClipResult, QKHeads, apply_qk_clip, per_head_logit_max, qk_heads
from .records import InterventionResult, MatrixResult
from .rewrite import RewriteError, StatsMode, rewrite_targets, spectral_norm_estimate
from .snapshot import Snapshot

__all__ = [
    "DEFAULT_STEPS",
    "Engine",
    "InterventionResult",
    "LearningRateScale",
    "MSign",
    "MatrixResult",
    "PSSVariant",
    "QKClipResult",
    "QKHeads",
    "RewriteError",
    "Snapshot",
    "StatsMode",
    "apply_msign",
    "apply_pss",
    "apply_qk_clip",
    "default_engine",
    "msign_newton_schulz",
    "msign_svd",
    "per_head_logit_max",
    "polar_factor",
    "qk_heads",
    "rewrite_targets",
    "smooth_singular_values",
    "spectral_norm_estimate",
    "steps_for_floor",
]
