"""The server's one NaN/±Inf codec for JSON: docs/contract.md carries non-finite floats as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (JSON has no literal for them).

Standard library only, so the pure alert engine can use it too. The HTTP side (the JSON
response that applies it) is ``server/middleware.py``.
"""

from __future__ import annotations

import math
from typing import Any

_DECODE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_float(value: float | None) -> float | str | None:
    """A float as JSON can carry it: the contract's strings for NaN and ±Inf."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def decode_float(value: Any) -> float:
    """Inverse of ``encode_float``; also accepts ints and plain float strings."""
    if isinstance(value, str):
        if value in _DECODE:
            return _DECODE[value]
        return float(value)
    if isinstance(value, bool):
        raise ValueError(f"value={value!r} is not a number")
    return float(value)


def wire_floats(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by its contract string, at any depth."""
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, dict):
        return {k: wire_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [wire_floats(v) for v in obj]
    return obj


__all__ = ["decode_float", "encode_float", "wire_floats"]
