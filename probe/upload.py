"""``rankguard upload PATH``: send a sink or spill file to a server after the fact.

An offline run (``server=None``) and a run whose server stayed down both leave a JSON Lines
file whose first line registers the run. Uploading opens an :class:`HttpTransport` on that
very file: it registers the run and replays every line not yet marked delivered, exactly as
a live probe does when its server comes back. Ingest is idempotent, so uploading a file
twice stores each point once. Needs httpx only (no torch): it runs in the server image.

A line that does not parse is skipped and the rest are sent; a last line cut short (what a
writer killed mid-write leaves) ends the file. Both are named, by line number, in the
returned report, which is never "every sample was delivered" when one was not. A server
that refuses the token ends the upload at once instead of retrying until ``timeout``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .http_transport import HttpTransport
from .transport import CloseReport

__all__ = ["upload"]


def upload(
    path: str | os.PathLike[str], *, server: str, token: str | None, timeout: float = 600.0
) -> CloseReport:
    """Sends every undelivered batch of ``path`` to ``server``; returns what was left over."""
    file = Path(path)
    with file.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        registration = json.loads(first)["run"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(
            f"path: {file} does not start with a run registration line; "
            "is it a rankguard sink or spill file?"
        ) from None
    transport = HttpTransport(
        server, token=token, registration=registration, spill_path=file, poll_commands=False
    )
    return transport.close(timeout=timeout)
