"""The seam between the probe and the world: the :class:`Transport` protocol the probe talks
to, its counters and close report, and the implementations that need no network.

``NullTransport`` keeps nothing (ranks that do not ship); ``SinkTransport`` writes to a local
sink (offline runs); ``MemoryTransport`` keeps everything in memory (tests). The real one,
:class:`~rankguard.probe.http_transport.HttpTransport`, lives in its own module.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Protocol

from .sink import Sink
from .wire import Batch, point_count

__all__ = [
    "CloseReport",
    "MemoryTransport",
    "NullTransport",
    "SinkTransport",
    "Transport",
    "TransportStats",
]


@dataclasses.dataclass
class TransportStats:
    """Counters a user can read through ``probe.stats()``."""

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
    """What ``close()`` could not deliver, and where it is kept."""

    delivered_all: bool
    undelivered_batches: int
    spill_path: str | None

    def __str__(self) -> str:
        if self.delivered_all:
            return "rankguard: every sample was delivered"
        return (
            f"rankguard: {self.undelivered_batches} batch(es) not delivered; kept in "
            f"{self.spill_path} — send them later with `rankguard upload {self.spill_path}`"
        )


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
    """Offline mode: batches go to a local sink (the JSON Lines file), no commands arrive."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._stats = TransportStats()

    def send(self, batch: Batch) -> None:
        self.sink.write(batch)
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
        return CloseReport(
            delivered_all=path is None,
            undelivered_batches=self._stats.spilled_batches if path is not None else 0,
            spill_path=str(path) if path is not None else None,
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
