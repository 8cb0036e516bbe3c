"""Where a webhook may be sent, and how long one attempt may take.

**Addresses.** A webhook URL is chosen by whoever holds an operate token, and the server
POSTs to it from inside the network it runs in. So the server refuses loopback, private,
link-local (cloud metadata at 169.254.169.254), shared (CGNAT 100.64/10), multicast,
unspecified and otherwise non-global addresses, in any spelling (``2130706433``,
``0177.0.0.1``, ``[::ffff:127.0.0.1]``), unless ``Settings.webhook_allow`` names their
network. The URL is checked when it is saved (``check_url``: literal addresses and local
names) and again at every send, after DNS: ``GuardedBackend`` resolves the host itself,
checks every address it gets, and connects to a checked address, so a name that resolves to
a public address at save time and to 127.0.0.1 at send time (DNS rebinding) is refused.
TLS still verifies the certificate against the URL's host name.

**Time.** httpx's timeouts bound each read, so a receiver that trickles one byte a second
holds a request for ever. ``attempt_deadline`` sets a wall-clock deadline for the whole
attempt (resolve, connect, TLS, send, status line and headers) that every socket operation
of the guarded transport is clamped to.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Names that mean this machine or a cloud's metadata service whatever DNS says.
LOCAL_NAMES = ("localhost", "localhost.localdomain", "metadata.google.internal")
CGNAT = ipaddress.ip_network("100.64.0.0/10")
# Without an attempt_deadline (a caller that forgot one), no attempt outlives this.
DEFAULT_DEADLINE_S = 30.0

_local = threading.local()
# getaddrinfo has no timeout of its own: it runs here, and the attempt waits for it no
# longer than its deadline (a stuck lookup finishes in the background).
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rankguard-dns")


class EgressRefused(httpcore.ConnectError):
    """The webhook's address is not one the server may send to (never retried)."""


def _category(ip: IPAddress) -> str | None:
    """What makes ``ip`` off limits, or None for a global unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return _category(embedded)
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local (cloud metadata)", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("shared (CGNAT)", isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def _allowed(ip: IPAddress, allow: Sequence[Network]) -> bool:
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c.version == net.version and c in net for c in candidates for net in allow)


def refusal(ip: IPAddress, allow: Sequence[Network]) -> str | None:
    """Why the server may not send to ``ip``, or None."""
    category = _category(ip)
    if category is None or _allowed(ip, allow):
        return None
    article = "an" if category[0] in "aeiou" else "a"
    return f"{ip} is {article} {category} address; allow its network in RANKGUARD_WEBHOOK_ALLOW"


def literal_address(host: str) -> IPAddress | None:
    """The address a host written as an IP literal means, in any spelling ``inet_aton``
    (and so the resolver) reads: dotted, decimal, octal, hexadecimal, short forms, IPv6."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or not all(c in "0123456789abcdefxABCDEFX." for c in host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def check_url(url: str, allow: Sequence[Network]) -> str | None:
    """Why a webhook URL is refused at save time, or None. Names that resolve elsewhere are
    checked again at each send (``GuardedBackend``)."""
    invalid = f"url={url[:200]!r} is not valid; use http(s)://host[:port]/path"
    try:
        httpx.URL(url)  # what the sender will parse
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
        parts.port  # noqa: B018 (raises for a port out of range)
    except (httpx.InvalidURL, ValueError):
        return invalid
    if parts.scheme not in ("http", "https") or not host:
        return invalid
    address = literal_address(host)
    if address is not None:
        return refusal(address, allow)
    if host in LOCAL_NAMES or host.endswith(".localhost"):
        loopback = ipaddress.ip_address("127.0.0.1")
        return None if _allowed(loopback, allow) else f"{host} is this machine (loopback)"
    return None


@contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    """Every socket operation of the guarded transport in this thread ends by
    ``now + seconds`` (connect, TLS, writes and reads together)."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = previous


def _deadline() -> float:
    deadline: float | None = getattr(_local, "deadline", None)
    return deadline if deadline is not None else time.monotonic() + DEFAULT_DEADLINE_S


def _left(deadline: float, timeout: float | None) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the webhook attempt ran out of time")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation is clamped to a wall-clock deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(self._deadline, timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(self._deadline, timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = _left(self._deadline, timeout)
        return DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, left), self._deadline
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class GuardedBackend(httpcore.NetworkBackend):
    """Resolves, checks and connects by address; the stream keeps the attempt's deadline."""

    def __init__(self, allow: Sequence[Network]) -> None:
        self.allow = tuple(allow)
        self._tcp = httpcore.SyncBackend()

    def _resolve(self, host: str, port: int, deadline: float) -> list[IPAddress]:
        future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=_left(deadline, None))
        except FutureTimeout:
            raise httpcore.ConnectTimeout(f"resolving {host} took too long") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        addresses = []
        for _, _, _, _, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        return addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        deadline = _deadline()
        addresses = self._resolve(host, port, deadline)
        # One refused address refuses the name: a rebinding resolver may hand out both.
        for address in addresses:
            reason = refusal(address, self.allow)
            if reason is not None:
                raise EgressRefused(f"webhook host {host!r} refused: {reason}")
        last: Exception | None = None
        for address in addresses:  # by address: the one checked is the one connected to
            try:
                stream = self._tcp.connect_tcp(
                    str(address), port, _left(deadline, timeout), local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                last = exc
                continue
            return DeadlineStream(stream, deadline)
        raise httpcore.ConnectError(f"cannot connect to {host}: {last}")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport over :class:`GuardedBackend`: no proxies from the environment, no
    kept-alive connections (each attempt connects, and is checked, afresh)."""

    def __init__(self, allow: Sequence[Network]) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=100,
            max_keepalive_connections=0,
            network_backend=GuardedBackend(allow),
        )


def guarded_client(allow: Sequence[Network]) -> httpx.Client:
    """The client every webhook request goes through (never follows redirects)."""
    return httpx.Client(transport=GuardedTransport(allow), follow_redirects=False, trust_env=False)


def is_refused(exc: BaseException) -> bool:
    """Whether an httpx error came from the address check (so retrying will not help)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, EgressRefused):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


__all__ = [
    "EgressRefused",
    "GuardedBackend",
    "GuardedTransport",
    "attempt_deadline",
    "check_url",
    "guarded_client",
    "is_refused",
    "literal_address",
    "refusal",
]
