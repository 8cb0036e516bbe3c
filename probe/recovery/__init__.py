"""Automatic recovery inside the training process.

- :mod:`.snapshots`: the ring of known-good training states in host memory
  (:class:`SnapshotRing`, :class:`TrainingSnapshot`, :class:`StateSource`);
- :mod:`.guard`: the device-side checks of every step and skip-step (:class:`StepGuard`);
- :mod:`.flight`: the flight recorder (:class:`FlightRecorder`);
- :mod:`.rollback`: the first response and rollback (:class:`Recovery`);
- :mod:`.sampler`: leaving out discarded batches on a replay (:class:`SkipWindowSampler`,
  :func:`skip_windows`).

Turned on with ``Probe(..., auto_recover=True)`` or ``recovery=RecoveryConfig(...)``
(:class:`~rankguard.probe.config.RecoveryConfig`). The sampler needs no torch; the rest
loads on first use, so importing this package stays torch-free.
"""

import importlib as _importlib
import typing as _typing

from ..config import RecoveryConfig
from .sampler import SkipWindowSampler, skip_windows

if _typing.TYPE_CHECKING:
    from .flight import FlightRecorder
    from .guard import StepGuard
    from .rollback import Recovery
    from .snapshots import SnapshotRing, StateSource, TrainingSnapshot

__all__ = [
    "FlightRecorder",
    "Recovery",
    "RecoveryConfig",
    "SkipWindowSampler",
    "SnapshotRing",
    "StateSource",
    "StepGuard",
    "TrainingSnapshot",
    "skip_windows",
]

_LAZY = {
    "FlightRecorder": ".flight",
    "Recovery": ".rollback",
    "SnapshotRing": ".snapshots",
    "StateSource": ".snapshots",
    "StepGuard": ".guard",
    "TrainingSnapshot": ".snapshots",
}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
