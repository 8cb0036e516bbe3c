"""Numpy plumbing shared by the bulk readers that fetch many series in one statement."""

from __future__ import annotations

from typing import Any

import numpy as np


def series_slices(sids: np.ndarray[Any, Any]) -> list[tuple[int, int, int]]:
    """(series id, start, end) of each run of equal ids in ``sids`` (rows ordered by series)."""
    if sids.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]]).tolist()
    ends = [*starts[1:], int(sids.size)]
    return [(int(sids[a]), a, b) for a, b in zip(starts, ends, strict=True)]
