"""Webhook delivery: ``deliver`` POSTs a rendered body with an injected ``httpx.Client``,
retrying connection errors, 5xx and 429 with exponential backoff and jitter (honouring
``Retry-After``), and returns one ``DeliveryAttempt`` per try for the caller to store. The
background worker that drives it from the outbox table is ``worker.py``.

Each attempt has a wall-clock deadline (``RetryPolicy.timeout_s`` for connect, send, status
line and headers together: ``egress.attempt_deadline``), and the receiver's body is never
read: what is kept of its answer is the status line, nothing it wrote after it.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timezone
from typing import Any

import httpx

from rankguard.server.notify import egress
from rankguard.server.notify.signing import signature_headers

USER_AGENT = "rankguard-webhook/1"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``max_attempts`` tries and ``max_total_s`` seconds in all.

    The n-th retry waits ``min(max_delay_s, base_delay_s * 2**(n-1))`` scaled by a random factor
    in ``[1 - jitter, 1]`` (so many webhooks failing together do not retry in lockstep), or the
    server's ``Retry-After`` when it gives one (a longer ``Retry-After`` than ``max_delay_s``
    ends the delivery rather than retrying early).
    """

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_total_s: float = 60.0
    jitter: float = 0.5
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts!r} is not valid; use >= 1")
        for name in ("base_delay_s", "max_delay_s", "max_total_s", "timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; use >= 0")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter={self.jitter!r} is not valid; use a number in [0, 1]")

    def backoff(self, retry: int, rng: Callable[[], float]) -> float:
        delay = min(self.max_delay_s, self.base_delay_s * 2.0 ** (retry - 1))
        return float(delay * (1.0 - self.jitter * rng()))


@dataclass(frozen=True)
class DeliveryAttempt:
    """One try: what the caller stores in its delivery log."""

    attempt: int
    url: str
    started_at: float  # unix seconds
    duration_s: float
    status_code: int | None
    error: str | None
    outcome: str  # "delivered" | "retry" | "failed"
    delay_s: float | None  # wait before the next try (outcome "retry")

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "url": self.url,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "status_code": self.status_code,
            "error": self.error,
            "outcome": self.outcome,
            "delay_s": self.delay_s,
        }


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    attempts: tuple[DeliveryAttempt, ...]


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - now)


def _printable(text: str, limit: int = 64) -> str:
    """A receiver's reason phrase as stored: printable ASCII, at most ``limit`` characters."""
    return "".join(c for c in text[:limit] if " " <= c <= "~")


def _retryable_status(code: int) -> bool:
    return code == 429 or 500 <= code <= 599


def deliver(
    client: httpx.Client,
    url: str,
    body: bytes,
    *,
    secret: str | None = None,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
    rng: Callable[[], float] = random.random,
) -> DeliveryResult:
    """POST ``body`` to ``url`` until a 2xx, a non-retryable answer or the policy's bounds.

    Retried: connection-level errors (``httpx.TransportError``), 5xx and 429. Not retried: other
    statuses (4xx mean the receiver refuses this body; 3xx are not followed). ``sleep``,
    ``clock`` and ``rng`` are injectable for tests.
    """
    policy = policy or RetryPolicy()
    attempts: list[DeliveryAttempt] = []
    begin = clock()
    for attempt in range(1, policy.max_attempts + 1):
        started = clock()
        request_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        request_headers.update(headers or {})
        if secret:
            request_headers.update(signature_headers(body, secret, int(started)))
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        retryable = False
        try:
            with (
                egress.attempt_deadline(policy.timeout_s),
                client.stream(
                    "POST", url, content=body, headers=request_headers, timeout=policy.timeout_s
                ) as response,
            ):
                status = response.status_code
                reason = _printable(response.reason_phrase)
                retry_header = response.headers.get("Retry-After")
            if 200 <= status <= 299:
                attempts.append(
                    DeliveryAttempt(
                        attempt, url, started, clock() - started, status, None, "delivered", None
                    )
                )
                return DeliveryResult(True, tuple(attempts))
            retryable = _retryable_status(status)
            error = f"HTTP {status} {reason}".rstrip()
            retry_after = parse_retry_after(retry_header, now=clock())
        except httpx.TransportError as exc:
            retryable = not egress.is_refused(exc)
            error = f"{type(exc).__name__}: {exc}"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # trying again will not help
            error = f"{type(exc).__name__}: {exc}"
        duration = clock() - started
        delay: float | None = None
        if retryable and attempt < policy.max_attempts:
            # Retry-After is honoured, never shortened: a wait beyond max_delay_s gives up.
            delay = policy.backoff(attempt, rng) if retry_after is None else retry_after
            if delay > policy.max_delay_s or clock() - begin + delay > policy.max_total_s:
                delay = None  # too long a wait, or past the total time budget
        if delay is None:
            attempts.append(
                DeliveryAttempt(attempt, url, started, duration, status, error, "failed", None)
            )
            return DeliveryResult(False, tuple(attempts))
        attempts.append(
            DeliveryAttempt(attempt, url, started, duration, status, error, "retry", delay)
        )
        sleep(delay)
    raise AssertionError("unreachable: the last attempt always returns")  # pragma: no cover


__all__ = [
    "USER_AGENT",
    "DeliveryAttempt",
    "DeliveryResult",
    "RetryPolicy",
    "deliver",
    "parse_retry_after",
]
