"""Ship the probe's samples to the rankguard server without ever making training wait.

The training thread only ever does ``send(batch)`` (a ``put_nowait`` on a bounded queue),
``take_commands()`` (pops a local inbox) and, when it applied a command, ``ack()`` (one
small append to the spill file, so the ack outlives a crash). Everything that touches the
network runs on one daemon thread:

    step thread ──send──▶ queue ──▶ sender thread ──POST──▶ server
                                         │  ▲
                          server down ──▶ spill file (JSON Lines, append-only)
                                         └──┘ replayed in order when the server answers again

The spill file (:mod:`.spill`) has the local sink's format, so a run that never reached the
server can be sent later with ``rankguard upload PATH``.

Honesty rules: a merged request the server refuses (4xx) is split until only the bad batch
is left, and only that one is lost; every lost batch is counted with its reason and named in
the close report; the batch in flight when ``close()`` gives up on a hanging server goes back
to the spill file. Whatever the server answers — any status, any bytes, any size — the
thread logs it once and goes on: nothing it reads can raise into training.

The client is injected (an ``httpx.Client``: tests pass one over an ASGI app or a mock
transport). httpx is the only dependency: no torch, so ``rankguard upload`` runs where torch
is not installed.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .http_call import Reply, call
from .spill import SpillFile, Unreadable
from .transport import CloseReport, Losses, TransportStats, describe_os_error
from .wire import (
    MAX_COMMANDS_PER_POLL,
    Batch,
    ack_batch,
    batch_size,
    merge_batches,
    parse_commands,
    parse_job_token,
    point_count,
)

__all__ = ["HttpTransport"]

logger = logging.getLogger("rankguard.probe.transport")


class _Outcome(enum.Enum):
    DELIVERED = "delivered"
    KEEP = "keep"  # not now (server down, token refused, run lost): spill and retry
    REFUSED = "refused"  # never (413, 422, 400): split a merged batch, or lose this one


class HttpTransport:
    """Sends batches to a rankguard server from a background thread; spills when it can't.

    Args:
        server: Base URL, e.g. ``http://127.0.0.1:8000``.
        token: Bearer token with the ``ingest`` scope, or None for a ``--no-auth`` server.
            When the run's registration reply carries a ``job_token`` (a token bound to this
            run), every later call of the run uses that one instead.
        registration: The run registration (``POST /runs`` body; its ``id`` is the
            client-generated run id).
        spill_path: The append-only file for batches the server did not take.
        client: Injected ``httpx.Client``; by default one with short timeouts.
        max_queue: Batches the queue holds; past that ``send`` spills on the caller's thread.
        poll_interval: Seconds between command polls.
        retry_interval: Seconds between attempts while the server is unreachable.
        max_batch_points: Points and histogram bins merged into one request at most
            (:func:`~rankguard.probe.wire.batch_size`).
        poll_commands: Whether to claim commands (off for uploads: they must not take
            commands meant for a live job).
        request_seconds: Longest time one request may take to read its reply (a server
            that trickles its answer is cut off).
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
        request_seconds: float = 30.0,
    ) -> None:
        if max_queue <= 0:
            raise ValueError(f"max_queue must be > 0, got {max_queue}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self._registration = registration
        self._run_path = f"/api/v1/runs/{quote(str(registration['id']), safe='')}"
        self._given_auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._auth = dict(self._given_auth)  # the job token, once the server mints one
        self._client = client or httpx.Client(
            base_url=server.rstrip("/"),
            timeout=httpx.Timeout(5.0, connect=2.0),
        )
        self._spill = SpillFile(Path(spill_path), registration)
        self._queue: queue.Queue[Batch] = queue.Queue(maxsize=max_queue)
        self._inbox: deque[dict[str, Any]] = deque()
        self._stats = TransportStats()
        self._stats_lock = threading.Lock()
        self._losses = Losses()
        self._poll_interval = poll_interval
        self._polls_commands = poll_commands
        self._retry_interval = retry_interval
        self._max_batch_points = max_batch_points
        self._request_seconds = request_seconds
        self._registered = False
        # Backoff after a failed call, kept apart for the command poll and for everything
        # else: a batch or an ack the server keeps failing (5xx) must not starve the poll that
        # may bring the command rescuing the run, nor a failing poll the data.
        self._down_until = {"data": 0.0, "poll": 0.0}
        self._refusal = ""  # why the server does not take our data now (401/403), if it says
        self._trouble = ""  # what went wrong with the last request, if it did
        self._next_poll = 0.0
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._drain_seconds = 5.0
        self._closed = False
        # The batches the sender thread has taken off the queue and not yet settled; close()
        # takes them back (into the spill) if the thread is stuck on a hanging server.
        self._flight_lock = threading.Lock()
        self._in_flight: list[Batch] | None = None
        self._carry: list[Batch] = []  # taken off the queue for the next request
        self._count_pending_lines()
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
        # Straight to the spill file (rare, and a command was just applied): the ack then
        # survives a kill, an outage and a restart, and the sender posts it from there.
        self._spill_batch(ack_batch(str(command_id), ack))

    def stats(self) -> TransportStats:
        with self._stats_lock:
            return dataclasses.replace(self._stats, dropped_batches=self._losses.total())

    def close(self, timeout: float = 10.0) -> CloseReport:
        if not self._closed:
            self._closed = True
            self._drain_seconds = timeout
            self._stop.set()
            self._thread.join(timeout + 1.0)
            with self._flight_lock:
                # Whatever the thread did not get to stays on disk, never lost: the batch it
                # may still be sending (a hanging server) and what is still queued.
                orphans, self._in_flight = [*(self._in_flight or []), *self._carry], None
                self._carry = []
                while True:
                    try:
                        orphans.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                for batch in orphans:
                    self._spill_batch(batch)
                self._spill.close()
            self._client.close()
        pending = self._count_pending_lines()
        dropped = self._losses.by_reason()
        if pending["unreadable"]:  # left in the file: an upload will skip them too
            dropped["unreadable line(s) left in the spill file"] = pending["unreadable"]
        report = CloseReport(
            delivered_all=not (pending["batches"] or pending["acks"] or dropped),
            undelivered_batches=pending["batches"],
            undelivered_acks=pending["acks"],
            spill_path=str(self._spill.path),
            dropped=dropped,
            detail=self._refusal or self._trouble,
        )
        if not report.delivered_all:
            logger.warning("%s", report)
        return report

    def _count_pending_lines(self) -> Counter[str]:
        """Undelivered spill lines by kind (batches, acks, unreadable); also the stats'."""
        counts = self._spill.count_pending()
        with self._stats_lock:
            self._stats.pending_spilled_batches = counts["batches"] + counts["acks"]
        return counts

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
                time.monotonic() > deadline
                or (self._queue.empty() and not self._carry and self._drained())
            ):
                return

    def _drained(self) -> bool:
        # While closing, a server in its backoff window is retried until the deadline: it
        # may have just come back (a restart), and close() promised to try for `timeout`.
        # A server that refused the token will not change its mind before then.
        return bool(self._refusal) or not self._spill.has_pending()

    def _tick(self, *, stopping: bool) -> None:
        batches = self._take_queued(timeout=0.05 if stopping else 0.2)
        if not self._ensure_registered():
            self._settle(batches, keep=batches)
            self._wait_retry(stopping)
            return
        if batches:
            # Keep the order: older spilled batches go first.
            keep = batches if self._spill.has_pending() else self._deliver(batches)
            self._settle(batches, keep)
        if not self._server_is_down():
            self._replay()
        if self._polls_commands and not stopping and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self._poll_interval
            self._poll_commands()

    def _take_queued(self, timeout: float) -> list[Batch]:
        """The next request's batches: queued ones merged up to ``max_batch_points``. Under
        the flight lock, so close() finds every batch queued, carried or in flight."""
        with self._flight_lock:
            batches, self._carry = self._carry, []
            if not batches:
                try:
                    batches = [self._queue.get(timeout=timeout)]
                except queue.Empty:
                    return []
            size = batch_size(batches[0])
            while True:
                try:
                    batch = self._queue.get_nowait()
                except queue.Empty:
                    break
                if size + batch_size(batch) > self._max_batch_points:
                    self._carry = [batch]  # the next request starts with it
                    break
                batches.append(batch)
                size += batch_size(batch)
            self._in_flight = batches
            return batches

    def _settle(self, batches: list[Batch], keep: list[Batch]) -> None:
        """The thread is done with ``batches``; ``keep`` go to the spill file, unless
        close() already took them all back."""
        if not batches:
            return
        with self._flight_lock:
            if self._in_flight is not batches:
                return
            self._in_flight = None
            for batch in keep:
                self._spill_batch(batch)

    def _server_is_down(self, channel: str = "data") -> bool:
        return time.monotonic() < self._down_until[channel]

    def _wait_retry(self, stopping: bool) -> None:
        if not stopping:
            self._stop.wait(min(self._retry_interval, 0.5))

    def _ensure_registered(self) -> bool:
        if self._registered:
            return True
        if self._server_is_down():
            return False
        # Registration always goes with the token the user gave: a job token is the
        # server's answer to it.
        reply = self._request("POST", "/api/v1/runs", self._registration, self._given_auth)
        if reply is None or reply.status not in (200, 201):
            self._note_refusal(reply)
            return False
        self._registered = True
        self._refusal = ""
        self._auth = self._job_auth(reply.body)
        return True

    def _job_auth(self, body: bytes) -> dict[str, str]:
        """The Authorization header for the run's later calls: the registration reply's
        ``job_token`` when it has a well-formed one, else the token given."""
        token, problem = parse_job_token(body)
        if problem:
            self._count_failure("job token", problem)
        return {"Authorization": f"Bearer {token}"} if token else dict(self._given_auth)

    def _deliver(self, batches: list[Batch]) -> list[Batch]:
        """Posts ``batches`` merged; returns those to keep for later. A merged request the
        server refuses is split in halves and retried, down to the one batch it refuses,
        which is lost (counted with the reason): the good batches around it arrive."""
        merged = merge_batches(batches)
        outcome, reason = self._post_batch(merged)
        if outcome is _Outcome.DELIVERED:
            with self._stats_lock:
                self._stats.sent_batches += len(batches)
                self._stats.sent_points += point_count(merged)
            return []
        if outcome is _Outcome.KEEP:
            return batches
        if len(batches) == 1:
            self._losses.add(reason)
            return []
        half = len(batches) // 2
        keep = self._deliver(batches[:half])
        return keep + batches[half:] if keep else self._deliver(batches[half:])

    def _post_batch(self, batch: Batch) -> tuple[_Outcome, str]:
        """POSTs one batch's points, histograms, events and acks; the outcome and, when
        refused, why."""
        if self._server_is_down():
            return _Outcome.KEEP, ""
        points = batch.get("points")
        if points and points.get("step"):
            outcome, reason = self._post(f"{self._run_path}/points", points)
            if outcome is not _Outcome.DELIVERED:
                return outcome, reason
        histograms = batch.get("histograms")
        if histograms:
            outcome, reason = self._post(f"{self._run_path}/histograms", {"histograms": histograms})
            if outcome is not _Outcome.DELIVERED:
                return outcome, reason
        # events (quantity_unavailable, the recovery's rollbacks...) are not idempotent on the
        # server: a replay after a crash between two posts records one twice, never loses it
        for event in batch.get("events") or ():
            outcome, reason = self._post(f"{self._run_path}/events", event)
            if outcome is not _Outcome.DELIVERED:
                return outcome, reason
        for item in batch.get("acks") or ():
            outcome, reason = self._post_ack(item)
            if outcome is not _Outcome.DELIVERED:
                return outcome, reason
        return _Outcome.DELIVERED, ""

    def _post(self, path: str, body: dict[str, Any]) -> tuple[_Outcome, str]:
        reply = self._request("POST", path, body, self._auth)
        if reply is not None and reply.status < 300:
            self._refusal = ""
            return _Outcome.DELIVERED, ""
        if reply is not None and reply.status in (400, 413, 422):
            # will never get better: the batch is lost, counted and named at close
            return _Outcome.REFUSED, f"refused by the server (http {reply.status})"
        self._forget_registration(reply)
        self._note_refusal(reply)
        return _Outcome.KEEP, ""  # 401/403 keep the data: a wrong token is fixable

    def _post_ack(self, item: Any) -> tuple[_Outcome, str]:
        if not (isinstance(item, dict) and isinstance(item.get("ack"), dict)):
            return _Outcome.REFUSED, "a command ack in the spill file is malformed"
        command = quote(str(item.get("id")), safe="")
        reply = self._request(
            "POST", f"{self._run_path}/commands/{command}/ack", item["ack"], self._auth
        )
        if reply is None or reply.status >= 500 or reply.status in (401, 403, 429):
            self._note_refusal(reply)
            return _Outcome.KEEP, ""
        if reply.status >= 300:  # unknown command, or acked otherwise before: final
            return _Outcome.REFUSED, f"command ack refused by the server (http {reply.status})"
        with self._stats_lock:
            self._stats.acks_sent += 1
        return _Outcome.DELIVERED, ""

    def _forget_registration(self, reply: Reply | None) -> None:
        # A server that answers 404 for our run lost it (new database), and one that refuses
        # the job token it minted may have too: register again (with the token given).
        job_token_refused = (
            reply is not None and reply.status == 401 and self._auth != self._given_auth
        )
        if reply is not None and (reply.status == 404 or job_token_refused):
            self._registered = False
            self._auth = dict(self._given_auth)
            self._down_until["data"] = time.monotonic() + self._retry_interval

    def _note_refusal(self, reply: Reply | None) -> None:
        if reply is not None and reply.status in (401, 403):
            self._refusal = f"the server refused the token: http {reply.status}"

    def _replay(self) -> None:
        for offset, item in self._spill.pending():
            if isinstance(item, Unreadable):
                self._losses.add(item.reason)
            else:
                outcome, reason = self._post_batch(item)
                if outcome is _Outcome.KEEP:
                    return
                if outcome is _Outcome.REFUSED:
                    self._losses.add(reason)
                elif item:
                    with self._stats_lock:
                        self._stats.replayed_batches += 1
            self._spill.mark_delivered(offset)
            with self._stats_lock:
                self._stats.pending_spilled_batches = max(
                    0, self._stats.pending_spilled_batches - 1
                )

    def _poll_commands(self) -> None:
        if self._server_is_down("poll"):
            return
        path, body = f"{self._run_path}/commands/claim", {"limit": MAX_COMMANDS_PER_POLL}
        reply = self._request("POST", path, body, self._auth, channel="poll")
        if reply is None or reply.status != 200:
            return
        commands, problems = parse_commands(reply.body)
        for problem in problems:
            self._count_failure("claim reply", problem)
        self._inbox.extend(commands)
        with self._stats_lock:
            self._stats.commands_received += len(commands)

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any],
        auth: dict[str, str],
        channel: str = "data",
    ) -> Reply | None:
        """One bounded HTTP call (:func:`.http_call.call`); None (and a backoff) when the
        server is unreachable or its answer unusable. Never raises."""
        try:
            reply = call(self._client, method, path, body, auth, seconds=self._request_seconds)
        except Exception as exc:  # httpx errors, a bad URL, a reply too large or too slow
            self._count_failure(type(exc).__name__, exc)
            self._trouble = f"the server did not answer usably: {type(exc).__name__}"
            self._down_until[channel] = time.monotonic() + self._retry_interval
            return None
        self._trouble = ""
        if reply.status >= 500 or reply.status == 429:
            self._count_failure(f"http {reply.status}", reply.detail())
            self._trouble = f"the server answered http {reply.status}"
            self._down_until[channel] = time.monotonic() + self._retry_interval
        elif reply.status >= 400:
            kind = path.rsplit("/", 1)[-1]
            self._count_failure(f"http {reply.status} on {kind}", reply.detail())
        return reply

    def _spill_batch(self, batch: Batch) -> None:
        try:
            self._spill.append(batch)
        except Exception as exc:  # a full disk, a closed file: lost, counted and named
            self._losses.add(f"could not be written to the spill file ({describe_os_error(exc)})")
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
