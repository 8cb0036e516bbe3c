"""The storage layer's error: a request that contradicts what is stored (routes answer 409)."""

from __future__ import annotations


class ConflictError(ValueError):
    """The request contradicts what is stored (-> 409)."""
