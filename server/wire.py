"""The server's one NaN/±Inf codec for JSON: docs/contract.md carries non-finite floats as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (JSON has no literal for them).

Standard library only, so the pure alert engine can use it too. The HTTP side (the JSON
response that applies it) is ``server/middleware.py``.
"""

from __future__ import annotations

import math
import re
from typing import Any

_DECODE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Free-form JSON objects (run config, event payload, command args) go into JSON columns:
# PostgreSQL text holds no NUL, no encoder writes a lone surrogate, 64-bit integers are what
# every backend and JSON library reads back, and deep nesting only serves to break a parser.
MAX_DEPTH = 32
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def encode_float(value: float | None) -> float | str | None:
    """A float as JSON can carry it: the contract's strings for NaN and ±Inf."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def decode_float(value: Any) -> float:
    """Inverse of ``encode_float``: a number, or exactly "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, str):
        if value in _DECODE:
            return _DECODE[value]
        raise ValueError(f"value={value!r} is not a number; non-finite values are {list(_DECODE)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"value={value!r} is not a number")
    return float(value)


def decode_floats(values: list[Any]) -> list[float]:
    """A list of numbers and the contract's strings as floats (one pass, no call per item)."""
    return [_DECODE[v] if v.__class__ is str else v for v in values]


class FreeFormError(ValueError):
    """A free-form object holds something no backend stores faithfully; ``path`` says where."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def _check_text(text: str, path: str) -> None:
    bad = _BAD_CHARS.search(text)
    if bad is not None:
        what = "a NUL character" if bad.group() == "\x00" else "a lone surrogate"
        raise FreeFormError(path, f"holds {what} at index {bad.start()}; no database stores it")


def free_form(obj: Any, path: str = "", depth: int = 0) -> Any:
    """``obj`` made storable, or ``FreeFormError`` naming the offending path: non-finite
    floats become the contract's strings; integers outside 64 bits, strings with NUL or lone
    surrogates, and nesting deeper than ``MAX_DEPTH`` are refused."""
    if depth > MAX_DEPTH:
        raise FreeFormError(path or "$", f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, str):
        _check_text(obj, path or "$")
        return obj
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, int):
        if not INT_MIN <= obj <= INT_MAX:
            raise FreeFormError(path or "$", "integer outside the signed 64-bit range")
        return obj
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            key = str(key)
            where = f"{path}.{key}" if path else key
            _check_text(key, where)
            out[key] = free_form(value, where, depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [free_form(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
    raise FreeFormError(path or "$", f"{type(obj).__name__} is not a JSON value")


def wire_floats(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by its contract string, at any depth."""
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, dict):
        return {k: wire_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [wire_floats(v) for v in obj]
    return obj


__all__ = [
    "MAX_DEPTH",
    "FreeFormError",
    "decode_float",
    "decode_floats",
    "encode_float",
    "free_form",
    "wire_floats",
]
