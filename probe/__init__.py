"""rankguard.probe: spectral early warning inside a PyTorch training process.

from rankguard.probe import Probe
probe = Probe(model, optimizer, run="gpt-lr3e-3")
...; optimizer.step(); probe.step(loss)
probe.close()
"""

from __future__ import annotations

from .config import ProbeConfig
from .control import CommandError, CommandRunner, parse_command
from .exceptions import ConfigError, ConfigTypeError, ProbeError, QuantityError, SelectorError
from .http_transport import HttpTransport
from .interventions import MSign, Snapshot, apply_msign, apply_pss
from .probe import Probe
from .quantities import REGISTRY as QUANTITIES
from .quantities import Histogram, PowerIteration, Quantity, StepContext, Triplet, Values
from .schedules import Every, Never, Schedule, every
from .sink import FileSink, MemorySink, NullSink, Sink, read_jsonl
from .targets import WeightTarget, find_blocks, find_targets, select
from .transport import (
    CloseReport,
    MemoryTransport,
    NullTransport,
    SinkTransport,
    Transport,
    TransportStats,
)
from .upload import upload
from .wire import Point, encode_batch

__all__ = [
    "QUANTITIES",
    "CloseReport",
    "CommandError",
    "CommandRunner",
    "ConfigError",
    "ConfigTypeError",
    "Every",
    "FileSink",
    "Histogram",
    "HttpTransport",
    "MSign",
    "MemorySink",
    "MemoryTransport",
    "Never",
    "NullSink",
    "NullTransport",
    "Point",
    "PowerIteration",
    "Probe",
    "ProbeConfig",
    "ProbeError",
    "Quantity",
    "QuantityError",
    "Schedule",
    "SelectorError",
    "Sink",
    "SinkTransport",
    "Snapshot",
    "StepContext",
    "Transport",
    "TransportStats",
    "Triplet",
    "Values",
    "WeightTarget",
    "apply_msign",
    "apply_pss",
    "encode_batch",
    "every",
    "find_blocks",
    "find_targets",
    "parse_command",
    "read_jsonl",
    "select",
    "upload",
]
