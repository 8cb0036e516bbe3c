"""The probe's quantities, one module each, behind :class:`Quantity`. ``REGISTRY`` maps the
name users pass in ``Probe(quantities=...)`` to the class; some classes emit several wire
names (``jacobian_alignment`` also emits ``jacobian_spectral_norm`` and
``jacobian_alignment_gain``; ``sa_sign_diversity`` also the ``sa_cosine`` histogram)."""

from __future__ import annotations

from .attention_logit_bound import AttentionLogitBound
from .attention_logit_max import AttentionLogitMax
from .base import Histogram, Quantity, StepContext, Values
from .grad_norm import GradNorm
from .jacobian_alignment import JacobianAlignment
from .non_finite import NonFinite
from .representation_stable_rank import RepresentationStableRank
from .sa_sign_diversity import SaSignDiversity
from .singularity_alignment import SingularityAlignment
from .spectral import PowerIteration, Triplet
from .spectral_norm import SpectralNorm
from .stable_rank import StableRank
from .update_ratio import UpdateRatio

__all__ = [
    "REGISTRY",
    "AttentionLogitBound",
    "AttentionLogitMax",
    "GradNorm",
    "Histogram",
    "JacobianAlignment",
    "NonFinite",
    "PowerIteration",
    "Quantity",
    "RepresentationStableRank",
    "SaSignDiversity",
    "SingularityAlignment",
    "SpectralNorm",
    "StableRank",
    "StepContext",
    "Triplet",
    "UpdateRatio",
    "Values",
]

REGISTRY: dict[str, type[Quantity]] = {
    cls.name: cls
    for cls in (
        StableRank,
        SpectralNorm,
        SaSignDiversity,
        RepresentationStableRank,
        SingularityAlignment,
        JacobianAlignment,
        GradNorm,
        UpdateRatio,
        NonFinite,
        AttentionLogitMax,
        AttentionLogitBound,
    )
}
