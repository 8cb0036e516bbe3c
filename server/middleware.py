"""HTTP plumbing of the wire format: the JSON response that writes non-finite floats as the
contract's strings (with the codec of ``server/wire.py``), the route class whose requests
parse JSON bodies with pydantic-core, and the ASGI middleware that caps (and inflates)
request bodies."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rankguard.server.wire import wire_floats


class WireJSONResponse(JSONResponse):
    """Starlette's JSONResponse refuses NaN (``allow_nan=False``, since JSON has no NaN);
    here NaN/±Inf become "NaN"/"Infinity"/"-Infinity" as docs/contract.md fixes."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(
                content, ensure_ascii=False, allow_nan=False, separators=(",", ":")
            ).encode("utf-8")
        except ValueError:  # a non-finite float somewhere: walk and replace (rare path)
            return json.dumps(
                wire_floats(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")
            ).encode("utf-8")


class WireRequest(Request):
    """A request whose JSON body is parsed by pydantic-core (the parser ingest uses) instead
    of the standard library's: it refuses lone surrogates and nesting past its recursion
    limit as a 422, where ``json.loads`` accepts the first (which no database then stores)
    and dies with ``RecursionError`` (a 500) on the second. Bare NaN/Infinity tokens are
    still read, as Python's own json writes them."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=True)
            except ValueError as exc:
                # FastAPI answers a JSONDecodeError with its 422 "json_invalid".
                doc = body[:200].decode("utf-8", errors="replace")
                raise json.JSONDecodeError(str(exc), doc, 0) from None
        return self._json


class WireRoute(APIRoute):
    """The API's route class: hands its endpoint a :class:`WireRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wire_handler(request: Request) -> Response:
            return await handler(WireRequest(request.scope, request.receive))

        return wire_handler


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413, also chunked ones without Content-Length
    and gzip bodies whose *decompressed* size is over the cap (inflation stops at the cap,
    so a zip bomb costs at most ``max_bytes`` of memory). Gzip bodies reach the routes
    already inflated, with ``Content-Encoding`` removed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding not in ("identity", "gzip", ""):
            await error_response(
                send, 415, f"Content-Encoding {encoding!r} is not supported; use gzip"
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(send, 413, self._too_large("request body"))
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await error_response(send, 413, self._too_large("request body"))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if encoding == "gzip" and body:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                body = inflater.decompress(body, self.max_bytes + 1)
            except zlib.error as exc:
                await error_response(send, 400, f"gzip body could not be decompressed: {exc}")
                return
            if len(body) > self.max_bytes:
                await error_response(send, 413, self._too_large("decompressed request body"))
                return
            if not inflater.eof:
                await error_response(send, 400, "gzip body is truncated")
                return
        new_headers = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")
        ]
        new_headers.append((b"content-length", str(len(body)).encode()))
        scope = {**scope, "headers": new_headers}
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, what: str) -> str:
        return (
            f"{what} exceeds max_body_bytes={self.max_bytes} bytes; send smaller batches "
            "(or raise RANKGUARD_MAX_BODY_BYTES)"
        )


async def error_response(send: Send, status: int, detail: object) -> None:
    """A JSON ``{"detail": ...}`` answer from ASGI middleware (before any route ran)."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
