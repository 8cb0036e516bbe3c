"""Leaving out the batches a rollback discarded, when the data is replayed.

A rollback restores the state of step s at step t and records the window [s + 1, t]: the
batches whose updates were thrown away (``probe.skip_windows``, in the probe's steps, which
count batches and never go back). A loop that keeps drawing fresh batches after a rollback
skips them by construction. A loader that is *replayed* (the next epoch in the same order, a
restart from a checkpoint, a data position rewound with the training step) would feed them
again: wrap its batch sampler, or the loader itself, and they are left out.

    from rankguard.probe.recovery import SkipWindowSampler
    loader = DataLoader(data, batch_sampler=SkipWindowSampler(BatchSampler(...), probe))

Positions count the batches this wrapper has yielded or skipped since it was created (or
``start``), across epochs, as the probe counts its steps: one batch per ``probe.step``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["SkipWindowSampler", "skip_windows"]

T = TypeVar("T")
Windows = Sequence[tuple[int, int]]


def _source(windows: Any) -> Callable[[], Windows]:
    """A probe (its live ``skip_windows``), a callable, or a fixed list of windows."""
    if hasattr(windows, "skip_windows"):
        return lambda: windows.skip_windows
    if callable(windows):
        return windows  # type: ignore[no-any-return]
    fixed = [(int(a), int(b)) for a, b in windows]
    return lambda: fixed


def _skipped(position: int, windows: Windows) -> bool:
    return any(start <= position <= end for start, end in windows)


class SkipWindowSampler(Generic[T]):
    """Wraps a (batch) sampler: yields its items except those at skipped positions.

    Args:
        sampler: any iterable (a ``BatchSampler``: one item per batch).
        windows: the probe (its ``skip_windows``, read live), a callable returning windows,
            or a list of inclusive ``(start, end)`` positions.
        start: the position of the first item (a run resumed at step N: N).
    """

    def __init__(self, sampler: Iterable[T], windows: Any, *, start: int = 0) -> None:
        self.sampler = sampler
        self._windows = _source(windows)
        self.position = start

    def __iter__(self) -> Iterator[T]:
        for item in self.sampler:
            position = self.position
            self.position += 1
            if not _skipped(position, self._windows()):
                yield item

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def skip_windows(loader: Iterable[T], windows: Any, *, start: int = 0) -> Iterator[T]:
    """The data-loader wrapper: iterates ``loader`` and leaves out the skipped positions.
    (Drawing a batch to discard it costs its loading; a batch sampler wrapper avoids that.)"""
    yield from SkipWindowSampler(loader, windows, start=start)
