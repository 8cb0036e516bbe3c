"""rankguard.probe: spectral early warning inside a PyTorch training process.

    from rankguard.probe import Probe
    probe = Probe(model, optimizer, run="gpt-lr3e-3")
    ...; optimizer.step(); probe.step(loss)
    probe.close()

``__all__`` is what a training script needs. Code that extends the probe imports from the
module that owns the concept (each has its own ``__all__``):

- a quantity: :mod:`rankguard.probe.quantities` (``Quantity``, ``StepContext``, ``Values``,
  ``Histogram``, ``Triplet``, ``PowerIteration``) and :mod:`rankguard.probe.schedules`;
- where batches go: :mod:`rankguard.probe.transport` (the ``Transport`` protocol, null, memory
  and sink transports), :mod:`rankguard.probe.http_transport`, :mod:`rankguard.probe.sink`;
- the wire format: :mod:`rankguard.probe.wire`;
- weights and commands: :mod:`rankguard.probe.targets`, :mod:`rankguard.probe.control`,
  :mod:`rankguard.probe.interventions`.

The extension names this package exported before stay importable from it (not in ``__all__``).

Importing this package does not import torch: the names that need it load on first use, so
the torch-free half (configuration, wire format, transports, ``upload``) works where torch is
not installed, as in the server image's ``rankguard upload``.
"""

import importlib as _importlib
import typing as _typing

from .config import ProbeConfig, RecoveryConfig
from .exceptions import (
    CommandError,
    ConfigError,
    ConfigTypeError,
    ProbeError,
    QuantityError,
    SelectorError,
)
from .recovery.sampler import SkipWindowSampler, skip_windows
from .sink import read_jsonl
from .transport import CloseReport, TransportStats
from .upload import upload

if _typing.TYPE_CHECKING:
    from .interventions import MSign, Snapshot, apply_msign, apply_pss
    from .probe import Probe
    from .quantities import REGISTRY as QUANTITIES

__all__ = [
    "QUANTITIES",
    "CloseReport",
    "CommandError",
    "ConfigError",
    "ConfigTypeError",
    "MSign",
    "Probe",
    "ProbeConfig",
    "ProbeError",
    "QuantityError",
    "RecoveryConfig",
    "SelectorError",
    "SkipWindowSampler",
    "Snapshot",
    "TransportStats",
    "apply_msign",
    "apply_pss",
    "read_jsonl",
    "skip_windows",
    "upload",
]

# name -> (module, attribute): the user names that need torch, loaded on first use
_LAZY = {
    "MSign": (".interventions", "MSign"),
    "Probe": (".probe", "Probe"),
    "QUANTITIES": (".quantities", "REGISTRY"),
    "Snapshot": (".interventions", "Snapshot"),
    "apply_msign": (".interventions", "apply_msign"),
    "apply_pss": (".interventions", "apply_pss"),
}

# name -> module: the extension names exported here before, kept importable from their homes
_EXTENSION_HOMES = {
    "CommandRunner": ".control",
    "Every": ".schedules",
    "FileSink": ".sink",
    "Histogram": ".quantities",
    "HttpTransport": ".http_transport",
    "MemorySink": ".sink",
    "MemoryTransport": ".transport",
    "Never": ".schedules",
    "NullSink": ".sink",
    "NullTransport": ".transport",
    "Point": ".wire",
    "PowerIteration": ".quantities",
    "Quantity": ".quantities",
    "Schedule": ".schedules",
    "Sink": ".sink",
    "SinkTransport": ".transport",
    "StepContext": ".quantities",
    "Transport": ".transport",
    "Triplet": ".quantities",
    "Values": ".quantities",
    "WeightTarget": ".targets",
    "encode_batch": ".wire",
    "every": ".schedules",
    "find_blocks": ".targets",
    "find_targets": ".targets",
    "parse_command": ".control",
    "select": ".targets",
}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(_importlib.import_module(module, __name__), attribute)
        globals()[name] = value  # loaded once; later lookups skip this function
        return value
    if name in _EXTENSION_HOMES:
        return getattr(_importlib.import_module(_EXTENSION_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
