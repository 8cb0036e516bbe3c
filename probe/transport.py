"""The seam between the probe and the world: the :class:`Transport` protocol the probe talks
to, its counters and close report, and the implementations that need no network.

``NullTransport`` keeps nothing (ranks that do not ship); ``SinkTransport`` writes to a local
sink (offline runs); ``MemoryTransport`` keeps everything in memory (tests). The real one,
:class:`~rankguard.probe.http_transport.HttpTransport`, lives in its own module.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any, Protocol

from .sink import Sink
from .wire import Batch, point_count

__all__ = [
    "CloseReport",
    "Losses",
    "MemoryTransport",
    "NullTransport",
    "SinkTransport",
    "Transport",
    "TransportStats",
    "describe_os_error",
]

logger = logging.getLogger("rankguard.probe.transport")


@dataclasses.dataclass
class TransportStats:
    """Counters a user can read through ``probe.stats()``. ``dropped_batches`` counts every
    batch (or command ack) lost for good; the close report says why."""

    sent_batches: int = 0
    sent_points: int = 0
    spilled_batches: int = 0
    replayed_batches: int = 0
    dropped_batches: int = 0
    failed_requests: int = 0
    commands_received: int = 0
    acks_sent: int = 0
    pending_spilled_batches: int = 0


@dataclasses.dataclass(frozen=True)
class CloseReport:
    """What ``close()`` could not deliver, where it is kept, and what was lost and why.

    ``undelivered_batches`` and ``undelivered_acks`` are kept in ``spill_path`` for
    ``rankguard upload``; ``dropped`` maps each reason to the batches (or acks) lost for it.
    ``detail`` says why the undelivered ones were not delivered, when the transport knows.
    """

    delivered_all: bool
    undelivered_batches: int
    spill_path: str | None
    undelivered_acks: int = 0
    dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    detail: str = ""

    @property
    def dropped_batches(self) -> int:
        return sum(self.dropped.values())

    def __str__(self) -> str:
        if self.delivered_all:
            return "rankguard: every sample was delivered"
        parts: list[str] = []
        if self.undelivered_batches or self.undelivered_acks or not self.dropped:
            what = f"{self.undelivered_batches} batch(es)"
            if self.undelivered_acks:
                what += f" and {self.undelivered_acks} command ack(s)"
            why = f" ({self.detail})" if self.detail else ""
            parts.append(
                f"{what} not delivered{why}; kept in {self.spill_path} — send them later "
                f"with `rankguard upload {self.spill_path}`"
            )
        if self.dropped:
            reasons = "; ".join(f"{why} (x{n})" for why, n in sorted(self.dropped.items()))
            parts.append(f"{self.dropped_batches} lost: {reasons}")
        return "rankguard: " + "; ".join(parts)


class Losses:
    """Batches lost for good, counted by reason; each reason is logged once when first seen
    (thread-safe: the training thread and the transport's thread both report)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, reason: str, n: int = 1) -> None:
        with self._lock:
            first = reason not in self._counts
            self._counts[reason] += n
        if first:
            logger.warning("rankguard: lost a batch: %s (further ones counted)", reason)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def describe_os_error(exc: BaseException) -> str:
    """An I/O error as a reason: its strerror ("No space left on device") when it has one."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


class Transport(Protocol):
    """Where the probe's batches go and where its commands come from."""

    def send(self, batch: Batch) -> None:
        """Hands over one sample step's batch. Never blocks, never raises."""

    def take_commands(self) -> list[dict[str, Any]]:
        """Returns the commands received since the last call (local inbox, no I/O)."""

    def ack(self, command_id: str, ack: dict[str, Any]) -> None:
        """Queues the acknowledgement of a command. Never blocks, never raises."""

    def stats(self) -> TransportStats:
        """Returns a snapshot of the counters."""

    def close(self, timeout: float = 10.0) -> CloseReport:
        """Flushes what it can within ``timeout`` seconds and stops."""


class NullTransport:
    """The null object: drops everything (non-zero ranks under DDP, ``probe=False`` runs)."""

    def send(self, batch: Batch) -> None:
        return None

    def take_commands(self) -> list[dict[str, Any]]:
        return []

    def ack(self, command_id: str, ack: dict[str, Any]) -> None:
        return None

    def stats(self) -> TransportStats:
        return TransportStats()

    def close(self, timeout: float = 10.0) -> CloseReport:
        return CloseReport(delivered_all=True, undelivered_batches=0, spill_path=None)


class SinkTransport:
    """Offline mode: batches go to a local sink (the JSON Lines file), no commands arrive.
    A batch the sink refuses (a full disk) is counted as lost and named in the report."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._stats = TransportStats()
        self._losses = Losses()

    def send(self, batch: Batch) -> None:
        try:
            self.sink.write(batch)
        except Exception as exc:  # never into training: count it, say why at close
            self._losses.add(f"could not be written to the sink ({describe_os_error(exc)})")
            self._stats.dropped_batches += 1
            return
        self._stats.spilled_batches += 1

    def take_commands(self) -> list[dict[str, Any]]:
        return []

    def ack(self, command_id: str, ack: dict[str, Any]) -> None:
        return None

    def stats(self) -> TransportStats:
        return dataclasses.replace(self._stats)

    def close(self, timeout: float = 10.0) -> CloseReport:
        self.sink.close()
        path = getattr(self.sink, "path", None)
        dropped = self._losses.by_reason()
        return CloseReport(
            delivered_all=path is None and not dropped,
            undelivered_batches=self._stats.spilled_batches if path is not None else 0,
            spill_path=str(path) if path is not None else None,
            dropped=dropped,
        )


class MemoryTransport:
    """Keeps batches and acks in lists and serves commands pushed by the test."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.acks: list[tuple[str, dict[str, Any]]] = []
        self.inbox: deque[dict[str, Any]] = deque()
        self._stats = TransportStats()

    def send(self, batch: Batch) -> None:
        self.batches.append(batch)
        self._stats.sent_batches += 1
        self._stats.sent_points += point_count(batch)

    def push_command(self, command: dict[str, Any]) -> None:
        self.inbox.append(command)

    def take_commands(self) -> list[dict[str, Any]]:
        taken = list(self.inbox)
        self.inbox.clear()
        self._stats.commands_received += len(taken)
        return taken

    def ack(self, command_id: str, ack: dict[str, Any]) -> None:
        self.acks.append((command_id, ack))
        self._stats.acks_sent += 1

    def stats(self) -> TransportStats:
        return dataclasses.replace(self._stats)

    def close(self, timeout: float = 10.0) -> CloseReport:
        return CloseReport(delivered_all=True, undelivered_batches=0, spill_path=None)
