"""Ship the probe's samples to the rankguard server without ever making training wait.

The training thread only ever does ``send(batch)`` (a ``put_nowait`` on a bounded queue) and
``take_commands()`` (pops a local inbox). Everything that touches the network runs on one
daemon thread:

    step thread ──send──▶ queue ──▶ sender thread ──POST──▶ server
                                         │  ▲
                          server down ──▶ spill file (JSON Lines, append-only)
                                         └──┘ replayed in order when the server answers again

The spill file (:mod:`.spill`) has the local sink's format, so a run that never reached the
server can be sent later with ``rankguard upload PATH``.

The client is injected (an ``httpx.Client``: tests pass one over an ASGI app or a mock
transport). httpx is the only dependency: no torch, so ``rankguard upload`` runs where torch
is not installed.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx

from .spill import SpillFile
from .transport import CloseReport, TransportStats
from .wire import Batch, encode_json, merge_batches, point_count

__all__ = ["HttpTransport"]

logger = logging.getLogger("rankguard.probe.transport")


class HttpTransport:
    """Sends batches to a rankguard server from a background thread; spills when it can't.

    Args:
        server: Base URL, e.g. ``http://127.0.0.1:8000``.
        token: Bearer token with the ``ingest`` scope, or None for a ``--no-auth`` server.
        registration: The run registration (``POST /runs`` body; its ``id`` is the
            client-generated run id).
        spill_path: The append-only file for batches the server did not take.
        client: Injected ``httpx.Client``; by default one with short timeouts.
        max_queue: Batches the queue holds; past that ``send`` spills on the caller's thread.
        poll_interval: Seconds between command polls.
        retry_interval: Seconds between attempts while the server is unreachable.
        max_batch_points: Points merged into one request at most.
        poll_commands: Whether to claim commands (off for uploads: they must not take
            commands meant for a live job).
    """

    def __init__(
        self,
        server: str,
        *,
        token: str | None,
        registration: dict[str, Any],
        spill_path: str | os.PathLike[str],
        client: httpx.Client | None = None,
        max_queue: int = 1024,
        poll_interval: float = 2.0,
        retry_interval: float = 2.0,
        max_batch_points: int = 50_000,
        poll_commands: bool = True,
    ) -> None:
        if max_queue <= 0:
            raise ValueError(f"max_queue must be > 0, got {max_queue}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self._registration = registration
        self._run_id = str(registration["id"])
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = client or httpx.Client(
            base_url=server.rstrip("/"),
            timeout=httpx.Timeout(5.0, connect=2.0),
        )
        self._client.headers.update(headers)
        self._spill = SpillFile(Path(spill_path), registration)
        self._queue: queue.Queue[Batch] = queue.Queue(maxsize=max_queue)
        self._acks: deque[tuple[str, dict[str, Any]]] = deque()
        self._inbox: deque[dict[str, Any]] = deque()
        self._stats = TransportStats(pending_spilled_batches=self._spill.count_pending())
        self._stats_lock = threading.Lock()
        self._poll_interval = poll_interval
        self._polls_commands = poll_commands
        self._retry_interval = retry_interval
        self._max_batch_points = max_batch_points
        self._registered = False
        self._server_down_until = 0.0
        self._next_poll = 0.0
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._drain_seconds = 5.0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="rankguard-transport", daemon=True)
        self._thread.start()

    @property
    def spill_path(self) -> Path:
        return self._spill.path

    # -- the training thread's side: constant time, no I/O unless the queue is full ----------

    def send(self, batch: Batch) -> None:
        if self._closed:
            self._spill_batch(batch)
            return
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            # Losing data is worse than one small file append on a full queue.
            self._spill_batch(batch)

    def take_commands(self) -> list[dict[str, Any]]:
        taken: list[dict[str, Any]] = []
        while self._inbox:
            taken.append(self._inbox.popleft())
        return taken

    def ack(self, command_id: str, ack: dict[str, Any]) -> None:
        self._acks.append((command_id, ack))

    def stats(self) -> TransportStats:
        with self._stats_lock:
            return dataclasses.replace(self._stats)

    def close(self, timeout: float = 10.0) -> CloseReport:
        if not self._closed:
            self._closed = True
            self._drain_seconds = timeout
            self._stop.set()
            self._thread.join(timeout + 1.0)
            # Whatever the thread did not get to stays on disk, never lost.
            while True:
                try:
                    self._spill_batch(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._client.close()
            self._spill.close()
        pending = self._spill.count_pending()
        with self._stats_lock:
            self._stats.pending_spilled_batches = pending
        report = CloseReport(
            delivered_all=pending == 0 and not self._acks,
            undelivered_batches=pending,
            spill_path=str(self._spill.path),
        )
        if not report.delivered_all:
            logger.warning("%s", report)
        return report

    # -- the sender thread --------------------------------------------------------------------

    def _loop(self) -> None:
        deadline: float | None = None
        while True:
            if self._stop.is_set() and deadline is None:
                deadline = time.monotonic() + self._drain_seconds
            try:
                self._tick(stopping=deadline is not None)
            except Exception as exc:  # never let the thread die: count, log once, go on
                self._count_failure("loop", exc)
            if deadline is not None and (
                time.monotonic() > deadline or (self._queue.empty() and self._drained())
            ):
                return

    def _drained(self) -> bool:
        # While closing, a server in its backoff window is retried until the deadline: it
        # may have just come back (a restart), and close() promised to try for `timeout`.
        return not self._spill.has_pending() and not self._acks

    def _tick(self, *, stopping: bool) -> None:
        batches = self._take_queued(timeout=0.05 if stopping else 0.2)
        if not self._ensure_registered():
            for batch in batches:
                self._spill_batch(batch)
            self._wait_retry(stopping)
            return
        if batches:
            if self._spill.has_pending():
                # Keep the order: older spilled batches go first.
                for batch in batches:
                    self._spill_batch(batch)
            elif not self._post_batch(merge_batches(batches)):
                for batch in batches:
                    self._spill_batch(batch)
        if not self._server_is_down():
            self._replay()
            self._send_acks()
        if self._polls_commands and not stopping and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self._poll_interval
            self._poll_commands()

    def _take_queued(self, timeout: float) -> list[Batch]:
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batches = [first]
        points = point_count(first)
        while points < self._max_batch_points:
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                break
            batches.append(batch)
            points += point_count(batch)
        return batches

    def _server_is_down(self) -> bool:
        return time.monotonic() < self._server_down_until

    def _wait_retry(self, stopping: bool) -> None:
        if not stopping:
            self._stop.wait(min(self._retry_interval, 0.5))

    def _ensure_registered(self) -> bool:
        if self._registered:
            return True
        if self._server_is_down():
            return False
        response = self._request("POST", "/api/v1/runs", self._registration)
        if response is not None and response.status_code in (200, 201):
            self._registered = True
            return True
        return False

    def _post_batch(self, batch: Batch) -> bool:
        """POSTs one batch's points, histograms and events; True when the server took them."""
        if self._server_is_down():
            return False
        points = batch.get("points")
        if points and points.get("step"):
            response = self._request("POST", f"/api/v1/runs/{self._run_id}/points", points)
            if not _accepted(response):
                self._forget_registration(response)
                return False
            self._count_rejected(response)
        histograms = batch.get("histograms")
        if histograms:
            body = {"histograms": histograms}
            response = self._request("POST", f"/api/v1/runs/{self._run_id}/histograms", body)
            if not _accepted(response):
                self._forget_registration(response)
                return False
            self._count_rejected(response)
        for event in batch.get("events") or ():
            # not idempotent on the server: a replay after a crash between two of these
            # lines records an event twice (a rare, visible duplicate, never a loss)
            response = self._request("POST", f"/api/v1/runs/{self._run_id}/events", event)
            if response is None or response.status_code >= 500:
                return False
            self._count_rejected(response)
        with self._stats_lock:
            self._stats.sent_batches += 1
            self._stats.sent_points += point_count(batch)
        return True

    def _forget_registration(self, response: httpx.Response | None) -> None:
        # A server that answers 404 for our run lost it (new database): register again.
        if response is not None and response.status_code == 404:
            self._registered = False
            self._server_down_until = time.monotonic() + self._retry_interval

    def _count_rejected(self, response: httpx.Response | None) -> None:
        if response is not None and response.status_code in (413, 422):
            with self._stats_lock:
                self._stats.dropped_batches += 1

    def _replay(self) -> None:
        replayed = 0
        for offset, batch in self._spill.pending():
            if not self._post_batch(batch):
                break
            self._spill.mark_delivered(offset)
            replayed += 1
        if replayed:
            with self._stats_lock:
                self._stats.replayed_batches += replayed
                self._stats.pending_spilled_batches -= replayed

    def _send_acks(self) -> None:
        while self._acks and not self._server_is_down():
            command_id, ack = self._acks[0]
            response = self._request(
                "POST", f"/api/v1/runs/{self._run_id}/commands/{command_id}/ack", ack
            )
            if response is None or response.status_code >= 500:
                return
            # A 4xx (unknown or already-acked command) will not get better by retrying.
            self._acks.popleft()
            with self._stats_lock:
                self._stats.acks_sent += 1

    def _poll_commands(self) -> None:
        if self._server_is_down():
            return
        response = self._request("POST", f"/api/v1/runs/{self._run_id}/commands/claim", {})
        if response is None or response.status_code != 200:
            return
        commands = response.json()
        if isinstance(commands, dict):
            commands = commands.get("data", [])
        self._inbox.extend(commands)
        with self._stats_lock:
            self._stats.commands_received += len(commands)

    def _request(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response | None:
        """One HTTP call, gzip-compressed; None (and a backoff) when the server is unreachable."""
        payload = gzip.compress(encode_json(body).encode(), compresslevel=1)
        try:
            response = self._client.request(
                method,
                path,
                content=payload,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        except httpx.HTTPError as exc:
            self._count_failure(type(exc).__name__, exc)
            self._server_down_until = time.monotonic() + self._retry_interval
            return None
        if response.status_code >= 500 or response.status_code == 429:
            self._count_failure(f"http {response.status_code}", response.text[:200])
            self._server_down_until = time.monotonic() + self._retry_interval
        elif response.status_code >= 400:
            self._count_failure(f"http {response.status_code} {path}", response.text[:200])
        return response

    def _spill_batch(self, batch: Batch) -> None:
        try:
            self._spill.append(batch)
        except OSError as exc:
            self._count_failure("spill", exc)
            with self._stats_lock:
                self._stats.dropped_batches += 1
            return
        with self._stats_lock:
            self._stats.spilled_batches += 1
            self._stats.pending_spilled_batches += 1

    def _count_failure(self, kind: str, detail: object) -> None:
        with self._stats_lock:
            self._stats.failed_requests += 1
        if kind not in self._warned:  # log each kind of failure once, not once per step
            self._warned.add(kind)
            logger.warning("rankguard transport: %s: %s (further ones counted)", kind, detail)


def _accepted(response: httpx.Response | None) -> bool:
    """Whether the server is done with this batch (so the spill file may move past it).

    401/403/404 keep the batch: a wrong token or a server that lost the run is an operator's
    problem to fix, and the data must survive it. 413 and 422 will never get better: the
    batch is dropped (counted and logged) so one bad line cannot block the spill forever.
    """
    if response is None:
        return False
    status = response.status_code
    return status < 300 or status in (413, 422)
