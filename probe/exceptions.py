"""The probe's exceptions. Configuration errors subclass ``ValueError``/``TypeError`` so that
callers who catch the builtin kinds keep working; every message names the argument, the
value given and what would be valid.

    ProbeError
    ├── ConfigError (ValueError)
    │   ├── SelectorError
    │   └── CommandError
    ├── ConfigTypeError (TypeError)
    └── QuantityError (RuntimeError)
"""

from __future__ import annotations

__all__ = [
    "CommandError",
    "ConfigError",
    "ConfigTypeError",
    "ProbeError",
    "QuantityError",
    "SelectorError",
]


class ProbeError(Exception):
    """Base class of every error the probe raises on purpose."""


class ConfigError(ProbeError, ValueError):
    """An argument has a value that cannot work (unknown name, glob matching nothing, ...)."""


class ConfigTypeError(ProbeError, TypeError):
    """An argument has the wrong type."""


class SelectorError(ConfigError):
    """A target selector ('attention', 'all_2d' or globs) is unknown or selects nothing."""


class CommandError(ConfigError):
    """A command that cannot be applied: unknown kind, unknown target, bad argument."""


class QuantityError(ProbeError, RuntimeError):
    """A quantity failed while computing (raised only with ``strict=True``; otherwise it is
    logged once and the quantity is disabled)."""
