"""The probe's public surface: curated ``__all__``, typed, no server dependencies."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import rankguard.probe as probe


def _public_names(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_all_is_exactly_the_public_surface() -> None:
    # httpx's test_exported_members: what the package binds publicly is what __all__ says
    for name in probe.__all__:
        getattr(probe, name)  # loads the names that need torch
    assert len(probe.__all__) == len(set(probe.__all__))
    assert set(probe.__all__) == _public_names(probe)


def test_extension_names_stay_importable_from_their_homes() -> None:
    for name, home in probe._EXTENSION_HOMES.items():
        owner = importlib.import_module(home, probe.__name__)
        assert name in owner.__all__, (name, home)
        assert getattr(probe, name) is getattr(owner, name)
    assert not set(probe._EXTENSION_HOMES) & set(probe.__all__)
    assert not set(probe._EXTENSION_HOMES) & _public_names(probe)  # resolved, never bound


def test_every_module_all_names_what_it_binds() -> None:
    for name in ("config", "exceptions", "schedules", "sink", "transport", "wire", "upload"):
        module = importlib.import_module(f"rankguard.probe.{name}")
        for exported in module.__all__:
            assert hasattr(module, exported), (name, exported)


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
        "attention_logit_bound",
    }


def test_errors_are_builtin_kinds() -> None:
    assert issubclass(probe.ConfigError, ValueError)
    assert issubclass(probe.SelectorError, ValueError)
    assert issubclass(probe.CommandError, ValueError)
    assert issubclass(probe.ConfigTypeError, TypeError)


def test_probe_imports_no_server_stack() -> None:
    code = (
        "import sys, rankguard.probe; "
        "bad = [m for m in ('pydantic', 'fastapi', 'sqlalchemy') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
