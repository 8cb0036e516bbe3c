"""The probe's public surface: curated ``__all__``, typed, no server dependencies."""

from __future__ import annotations

import subprocess
import sys

import rankguard.probe as probe

PUBLIC = {
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
}


def test_all_is_exactly_the_public_surface() -> None:
    # A name added to or dropped from the public API must be a deliberate change here too.
    assert len(probe.__all__) == len(set(probe.__all__))
    assert set(probe.__all__) == PUBLIC
    for name in probe.__all__:
        assert hasattr(probe, name), name


def test_quantity_names_match_the_contract() -> None:
    assert set(probe.QUANTITIES) == {
        "stable_rank",
        "spectral_norm",
        "sa_sign_diversity",
        "representation_stable_rank",
        "singularity_alignment",
        "jacobian_alignment",
        "grad_norm",
        "update_ratio",
        "non_finite",
        "attention_logit_max",
    }


def test_errors_are_builtin_kinds() -> None:
    assert issubclass(probe.ConfigError, ValueError)
    assert issubclass(probe.SelectorError, ValueError)
    assert issubclass(probe.ConfigTypeError, TypeError)


def test_probe_imports_no_server_stack() -> None:
    code = (
        "import sys, rankguard.probe; "
        "bad = [m for m in ('pydantic', 'fastapi', 'sqlalchemy') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
