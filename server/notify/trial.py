"""One-off sends for ``POST /webhooks/{id}/test``, on a few threads of their own.

A test send waits on a receiver the caller chose. Run in the request thread pool, a few dozen
slow receivers would take every thread and stall ``/healthz`` and ingest with them; here at
most ``workers`` run at once, at most ``queue`` more wait, and anything beyond is refused at
once (the route answers 429). Each send is bounded by its attempt deadline, so a thread
comes back within ``webhook_timeout_s``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class TrialsBusy(RuntimeError):
    """Too many test sends are running or waiting."""


class TrialSender:
    def __init__(self, *, workers: int, queue: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rankguard-test")
        self._slots = threading.BoundedSemaphore(workers + queue)

    async def run(self, fn: Callable[[], T], *, timeout_s: float) -> T:
        """``fn()`` on a trial thread; TrialsBusy when none is free nor queued for; waits at
        most ``timeout_s`` (the send itself has its own deadline)."""
        if not self._slots.acquire(blocking=False):
            raise TrialsBusy("too many webhook tests in flight; retry in a few seconds")
        try:
            future = self._pool.submit(fn)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["TrialSender", "TrialsBusy"]
