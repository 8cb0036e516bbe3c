"""One HTTP call of the probe's transport, bounded both ways: a gzip-compressed JSON body
goes out; at most :data:`MAX_REPLY_BYTES` of an identity-encoded reply come back within
``seconds``. A reply larger, slower or compressed is not read further
(:class:`UnusableReply`), so no server — compromised, or a man in the middle on a plain
``http://`` URL — can make the transport's thread hold unbounded memory or wait forever on
a trickling body. (The headers are bounded by the client's per-read timeout.) httpx only.
"""

from __future__ import annotations

import dataclasses
import gzip
import time
from typing import Any

import httpx

from .wire import encode_json

__all__ = ["MAX_REPLY_BYTES", "Reply", "UnusableReply", "call"]

MAX_REPLY_BYTES = 1 << 20  # a claim of 100 commands is a few kB; nothing else is read


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def detail(self) -> str:
        """The start of the body, for a log line."""
        return self.body[:200].decode("utf-8", "replace")


class UnusableReply(Exception):
    """A reply the transport will not read further: too large, too slow or compressed."""


def call(
    client: httpx.Client,
    method: str,
    path: str,
    body: dict[str, Any],
    auth: dict[str, str],
    *,
    seconds: float,
) -> Reply:
    """POSTs (or ``method``s) ``body``; the reply, read within the bounds. Raises httpx's
    errors and :class:`UnusableReply`."""
    payload = gzip.compress(encode_json(body).encode(), compresslevel=1)
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "Accept-Encoding": "identity",  # read as sent: a compressed bomb is never inflated
        **auth,
    }
    with client.stream(method, path, content=payload, headers=headers) as response:
        return Reply(response.status_code, _read_bounded(response, seconds))


def _read_bounded(response: httpx.Response, seconds: float) -> bytes:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):  # we asked for identity: not what we can trust
        raise UnusableReply(f"the reply is {encoding!r}-encoded")
    # an in-process transport (tests) has answered from memory already
    chunks_in = [response.content] if response.is_stream_consumed else response.iter_raw()
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    size = 0
    for chunk in chunks_in:
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise UnusableReply(f"the reply is over {MAX_REPLY_BYTES} bytes")
        if time.monotonic() > deadline:
            raise UnusableReply(f"the reply took over {seconds:g} s")
        chunks.append(chunk)
    return b"".join(chunks)
