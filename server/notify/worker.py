"""The webhook delivery worker: a background thread that sends the pending rows of
``webhook_deliveries`` (the outbox the ingest transaction wrote) and records each attempt.

Ingest never waits on a receiver: it commits the pending rows and calls ``wake()``. The
dispatcher thread claims pending rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several
server processes share the outbox without sending a row twice), marks them ``sending`` and
hands each to a small thread pool, where ``delivery.deliver`` retries with backoff; the
outcome and every attempt are written back. Rows left ``sending`` by a crash are sent again
at the next start (at-least-once: receivers dedupe on the alert id and status).

Receivers are isolated: a webhook has at most one delivery in flight (its next one waits,
so it also gets them in order), and the pool has ``webhook_workers`` threads, so a receiver
that is slow, or down and being retried, holds one thread and never delays the others.
Every request goes through ``egress.guarded_client`` (address checks, attempt deadline).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from rankguard.server.config import Settings
from rankguard.server.db import Database, utcnow
from rankguard.server.notify.delivery import RetryPolicy, deliver
from rankguard.server.notify.egress import guarded_client
from rankguard.server.secretbox import SecretBox, SecretUnavailable
from rankguard.server.storage.webhooks import (
    claim_deliveries,
    record_delivery,
    requeue_stale_deliveries,
)
from rankguard.server.vocab import DeliveryOutcome

logger = logging.getLogger("rankguard.server.notify.worker")


@dataclass(frozen=True)
class _Job:
    delivery_id: int
    webhook_id: int
    url: str
    secret: str | None  # as stored (sealed)
    body: bytes


class _Stopping(Exception):
    """Raised inside a backoff sleep when the worker shuts down."""


class DeliveryWorker:
    """Sends pending deliveries; ``start()``/``stop()`` from the app's lifespan."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        box: SecretBox,
        client_factory: Callable[[], httpx.Client] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.box = box
        self.policy = RetryPolicy(
            max_attempts=settings.webhook_max_attempts,
            max_total_s=settings.webhook_max_total_s,
            timeout_s=settings.webhook_timeout_s,
        )
        self._client_factory = client_factory or (lambda: guarded_client(settings.webhook_allow))
        self._client: httpx.Client | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._busy: set[int] = set()  # webhooks with a delivery in flight

    def start(self) -> None:
        self._requeue_stale()
        self._client = self._client_factory()
        self._pool = ThreadPoolExecutor(
            max_workers=self.settings.webhook_workers, thread_name_prefix="rankguard-webhook"
        )
        self._thread = threading.Thread(target=self._loop, name="rankguard-delivery", daemon=True)
        self._thread.start()
        self.wake()  # rows left pending by the previous process

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._client is not None:
            self._client.close()

    # -- dispatcher ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.delivery_poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._dispatch()
            except Exception:  # the database may be briefly away; try again on the next tick
                logger.exception("webhook dispatch failed")

    def _requeue_stale(self) -> None:
        with self.db.write() as session:
            requeue_stale_deliveries(session=session)

    def _dispatch(self) -> None:
        """Claims at most one delivery per idle webhook, as many as there are free threads."""
        with self._lock:
            busy = set(self._busy)
        free = self.settings.webhook_workers - len(busy)
        if free <= 0:
            return  # every thread busy; a finishing job wakes us
        jobs = self._claim(free, busy)
        assert self._pool is not None
        for job in jobs:
            with self._lock:
                self._busy.add(job.webhook_id)
            self._pool.submit(self._send, job)

    def _claim(self, limit: int, busy: set[int]) -> list[_Job]:
        with self.db.write() as session:
            rows = claim_deliveries(session=session, limit=limit, busy=busy)
        return [
            _Job(did, hook, url, secret, body.encode()) for did, hook, body, url, secret in rows
        ]

    # -- one delivery ----------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopping

    def _send(self, job: _Job) -> None:
        try:
            assert self._client is not None
            result = deliver(
                self._client,
                job.url,
                job.body,
                secret=self.box.open(job.secret),
                policy=self.policy,
                sleep=self._sleep,
            )
            last = result.attempts[-1]
            values = {
                "outcome": (
                    DeliveryOutcome.DELIVERED if result.delivered else DeliveryOutcome.FAILED
                ).value,
                "attempts": [a.to_dict() for a in result.attempts],
                "status_code": last.status_code,
                "error": last.error,
                "finished_at": utcnow(),
            }
        except _Stopping:
            values = {"outcome": DeliveryOutcome.PENDING.value}  # sent again at the next start
        except SecretUnavailable as exc:
            values = {
                "outcome": DeliveryOutcome.FAILED.value,
                "error": str(exc),
                "finished_at": utcnow(),
            }
        except Exception as exc:  # never let one delivery kill the pool
            logger.exception("webhook delivery %s failed", job.delivery_id)
            values = {
                "outcome": DeliveryOutcome.FAILED.value,
                "error": f"{type(exc).__name__}: {exc}",
                "finished_at": utcnow(),
            }
        try:
            with self.db.write() as session:
                record_delivery(session=session, delivery_id=job.delivery_id, values=values)
        except Exception:
            logger.exception("could not record webhook delivery %s", job.delivery_id)
        finally:
            with self._lock:
                self._busy.discard(job.webhook_id)
            self._wake.set()  # more may be waiting
