"""The probe's side of the wire format (docs/contract.md "Local sink / spill file"): a sampled
step's batch as plain JSON, and the probe's one NaN/±Inf codec.

A batch is ``{"v": 1, "run": {...}?, "points": {columnar}, "histograms": [...]}``; ``run``
(the registration) is only on the first line of a file. A command's acknowledgement travels
the same way, as ``{"v": 1, "acks": [{"id": ..., "ack": {...}}]}``. Non-finite floats travel
as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.

The server's answers come back through :func:`parse_commands`, which never raises: whatever
the bytes, it returns the well-formed commands and says what it threw away.

Pure functions, standard library only: the sink, the HTTP transport and ``rankguard upload``
share them, and none of them needs torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "MAX_COMMANDS_PER_POLL",
    "Batch",
    "Point",
    "ack_batch",
    "batch_size",
    "decode_float",
    "encode_batch",
    "encode_float",
    "encode_histogram",
    "encode_json",
    "encode_points",
    "iter_points",
    "merge_batches",
    "parse_commands",
    "parse_job_token",
    "point_count",
]

FORMAT_VERSION = 1

MAX_COMMANDS_PER_POLL = 100
"""Commands the probe asks for per claim (the server's default limit) and accepts at most."""

_MAX_COMMAND_ID = 200  # characters; the server's ids are uuids
_JOB_TOKEN = re.compile(r"[\x21-\x7e]{8,512}")  # printable ASCII, no spaces: header-safe

Batch = dict[str, Any]


@dataclass(frozen=True)
class Point:
    quantity: str
    target: str
    step: int
    value: float
    rank: int = 0
    wall_time: float | None = None


def encode_float(x: float) -> float | str:
    """A float as JSON can carry it: non-finite values become "NaN"/"Infinity"/"-Infinity"."""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def decode_float(x: float | int | str) -> float:
    """Inverse of :func:`encode_float`."""
    if isinstance(x, str):
        if x in ("NaN", "Infinity", "-Infinity"):
            return float(x.replace("Infinity", "inf"))
        raise ValueError(f"value: expected a number, 'NaN', 'Infinity' or '-Infinity', got {x!r}")
    return float(x)


def encode_json(body: Any) -> str:
    """Strict, compact JSON; a stray non-finite float anywhere in ``body`` (e.g. in an ack's
    result) travels as :func:`encode_float`'s string instead of failing."""
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(_finite_or_string(body), allow_nan=False, separators=(",", ":"))


def _finite_or_string(obj: Any) -> Any:
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, dict):
        return {key: _finite_or_string(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_string(value) for value in obj]
    return obj


def encode_points(points: Sequence[Point]) -> dict[str, list[Any]]:
    """Columnar form: one list per field, all the same length."""
    return {
        "quantity": [p.quantity for p in points],
        "target": [p.target for p in points],
        "rank": [p.rank for p in points],
        "step": [p.step for p in points],
        "wall_time": [p.wall_time for p in points],
        "value": [encode_float(p.value) for p in points],
    }


def encode_histogram(
    quantity: str,
    target: str,
    step: int,
    edges: Sequence[float],
    counts: Sequence[float],
    rank: int = 0,
) -> dict[str, Any]:
    return {
        "quantity": quantity,
        "target": target,
        "rank": rank,
        "step": step,
        "edges": [encode_float(e) for e in edges],
        "counts": [encode_float(c) for c in counts],
    }


def encode_batch(
    points: Sequence[Point],
    histograms: Sequence[Mapping[str, Any]] = (),
    run: Mapping[str, Any] | None = None,
    events: Sequence[Mapping[str, Any]] = (),
) -> Batch:
    """One batch; ``events`` (``{"kind", "step", "payload"}``, the body of
    ``POST /runs/{id}/events``) only when there are some."""
    batch: Batch = {"v": FORMAT_VERSION}
    if run is not None:
        batch["run"] = dict(run)
    batch["points"] = encode_points(points)
    batch["histograms"] = list(histograms)
    if events:
        batch["events"] = [dict(e) for e in events]
    return batch


def iter_points(batches: Iterable[Mapping[str, Any]]) -> Iterator[Point]:
    """Decodes the columnar points of batches back to :class:`Point` (values as floats)."""
    for b in batches:
        cols = b.get("points", {})
        for i in range(len(cols.get("value", []))):
            yield Point(
                quantity=cols["quantity"][i],
                target=cols["target"][i],
                step=int(cols["step"][i]),
                value=decode_float(cols["value"][i]),
                rank=int(cols.get("rank", [0] * (i + 1))[i]),
                wall_time=cols.get("wall_time", [None] * (i + 1))[i],
            )


def point_count(batch: Batch) -> int:
    """The number of points in an encoded batch."""
    points = batch.get("points") or {}
    return len(points.get("step", ()))


def batch_size(batch: Batch) -> int:
    """What a batch weighs against the transport's ``max_batch_points``: its points plus
    every histogram's bins. A bin (an edge and a count) is fewer bytes of JSON than a point
    (names, step, rank, time, value), so counting one per bin keeps a merged request within
    the bytes the same number of points would take."""
    bins = sum(len(h.get("counts") or ()) + 1 for h in batch.get("histograms") or ())
    return point_count(batch) + bins + len(batch.get("acks") or ())


def ack_batch(command_id: str, ack: Mapping[str, Any]) -> Batch:
    """A command's acknowledgement as a line of the spill file (a non-finite float in its
    result travels as :func:`encode_float`'s string, as everywhere on the wire)."""
    return {"v": FORMAT_VERSION, "acks": [{"id": command_id, "ack": _finite_or_string(dict(ack))}]}


def merge_batches(batches: list[Batch]) -> Batch:
    """Concatenates the columnar points, histograms and acks of several batches into one."""
    if len(batches) == 1:
        return batches[0]
    columns: dict[str, list[Any]] = {}
    histograms: list[Any] = []
    acks: list[Any] = []
    events: list[Any] = []
    for batch in batches:
        for name, column in (batch.get("points") or {}).items():
            columns.setdefault(name, []).extend(column)
        histograms.extend(batch.get("histograms") or [])
        acks.extend(batch.get("acks") or [])
        events.extend(batch.get("events") or [])
    merged: Batch = {"points": columns, "histograms": histograms}
    if acks:
        merged["acks"] = acks
    if events:
        merged["events"] = events
    return merged


def parse_commands(body: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """The commands of a claim reply, and what was wrong with the rest. Never raises.

    The server answers ``{"data": [command, ...], "count": n}`` (a bare list is accepted
    too). A command must be an object with an ``id`` (a string of at most 200 characters or
    an integer): without one it could not be acknowledged. Its ``kind`` and ``args`` are
    validated when it is applied (:func:`~rankguard.probe.control.parse_command`), which
    acknowledges a wrong one as failed. Anything else — bytes that are not JSON, nesting past
    the parser's depth, another shape, an entry that is no command, more than
    :data:`MAX_COMMANDS_PER_POLL` commands — is left out and described.
    """
    try:
        reply = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not JSON, bad UTF-8, too deep, huge ints
        return [], [f"the claim reply is not JSON ({type(exc).__name__})"]
    entries = reply.get("data") if isinstance(reply, dict) else reply
    if not isinstance(entries, list):
        return [], [f"the claim reply has no list of commands (got {type(reply).__name__})"]
    problems: list[str] = []
    if len(entries) > MAX_COMMANDS_PER_POLL:
        problems.append(
            f"the claim reply holds {len(entries)} commands; the first "
            f"{MAX_COMMANDS_PER_POLL} are taken"
        )
        entries = entries[:MAX_COMMANDS_PER_POLL]
    commands: list[dict[str, Any]] = []
    for entry in entries:
        problem = _command_problem(entry)
        if problem is None:
            commands.append(entry)
        else:
            problems.append(problem)
    return commands, problems


def _command_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"a claimed command is not an object (got {type(entry).__name__})"
    command_id = entry.get("id")
    if isinstance(command_id, bool) or not isinstance(command_id, (str, int)):
        return f"a claimed command has no usable id (got {type(command_id).__name__})"
    if isinstance(command_id, int) and not -(10**18) < command_id < 10**18:
        return "a claimed command's id is an integer out of range"
    if isinstance(command_id, str) and not 0 < len(command_id) <= _MAX_COMMAND_ID:
        return f"a claimed command's id is empty or longer than {_MAX_COMMAND_ID} characters"
    return None  # kind and args are validated when it is applied, and acked if wrong


def parse_job_token(body: bytes) -> tuple[str | None, str | None]:
    """The ``job_token`` of a run registration reply, and what was wrong with it. Never
    raises. (None, None): the reply has none (not JSON, not an object, or no such field);
    (None, problem): it has one that is not 8 to 512 printable ASCII characters without
    spaces (it would not make a safe header)."""
    try:
        reply = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    token = reply.get("job_token") if isinstance(reply, dict) else None
    if token is None:
        return None, None
    if not isinstance(token, str) or not _JOB_TOKEN.fullmatch(token):
        return None, "the registration reply's job_token is malformed; the given token is kept"
    return token, None
