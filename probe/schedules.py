"""When a quantity is computed: a schedule maps the global step to yes/no (cockpit's split of
*when* from *what*). Schedules are pure and cheap: the probe asks them on every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .exceptions import ConfigError, ConfigTypeError

__all__ = ["Every", "Never", "Schedule", "every"]


@runtime_checkable
class Schedule(Protocol):
    def __call__(self, step: int) -> bool:
        """Whether to compute at ``step`` (0-based count of ``probe.step`` calls)."""
        ...


@dataclass(frozen=True)
class Every:
    """Steps ``offset, offset + n, offset + 2n, ...``."""

    n: int
    offset: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int):
            raise ConfigTypeError(f"every: expected an int >= 1, got {self.n!r}")
        if self.n <= 0:
            raise ConfigError(f"every: must be >= 1, got {self.n}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise ConfigError(f"offset: must be an int >= 0, got {self.offset!r}")

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.n == 0


@dataclass(frozen=True)
class Never:
    """A schedule that never fires (a disabled quantity)."""

    def __call__(self, step: int) -> bool:
        return False


def every(n: int, offset: int = 0) -> Every:
    return Every(n, offset)
