"""The request guard (ASGI middleware), the same with or without ``--no-auth``:

- the Host header must name this server (``Settings.trusted_hosts``): a page whose DNS name
  was rebound to 127.0.0.1 reaches the server under the attacker's name, and is refused;
- a state-changing request that a browser marks cross-origin (``Origin`` or
  ``Sec-Fetch-Site``) is refused: a cross-site form or ``fetch`` cannot queue a command;
- a request body must be JSON (``Content-Type: application/json`` or ``+json``): a
  cross-site ``text/plain`` POST, which browsers send without a preflight, never parses;
- a NUL character in the path or a query parameter is refused (PostgreSQL text cannot hold
  one, so no stored name can contain it);
- every response says ``X-Content-Type-Options: nosniff`` and carries the Content Security
  Policy of the pages (scripts only from this server; no frames, no inline script).

Liveness and readiness (``/healthz``, ``/readyz``) skip the Host check: orchestrators probe
them by address, and they say nothing about the data.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rankguard.server.middleware import error_response

# plotly draws with inline styles; everything else comes from this server.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
]
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UNCHECKED_PATHS = frozenset({"/healthz", "/readyz"})


def host_name(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the lower-case name or address, without port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def is_json_type(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, any parameters."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class RequestGuard:
    """Refuses requests to a foreign Host (400), cross-origin writes (403) and non-JSON
    bodies (415); adds the security headers to every response."""

    def __init__(
        self, app: ASGIApp, *, hosts: frozenset[str] | None, origins: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.hosts = hosts  # None: any Host
        self.origins = origins  # host names whose pages may write (a proxy's public name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        refusal = self._refusal(scope, headers) or _nul_refusal(scope)
        if refusal is not None:
            status, detail = refusal
            await error_response(send_with_headers, status, detail)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope, headers: dict[bytes, str]) -> tuple[int, object] | None:
        host = headers.get(b"host", "")
        checked = self.hosts is not None and scope.get("path") not in UNCHECKED_PATHS
        if checked and self.hosts is not None and host_name(host) not in self.hosts:
            allowed = ", ".join(sorted(self.hosts))
            return 400, (
                f"Host {host!r} is not served here; allowed: {allowed} (RANKGUARD_ALLOWED_HOSTS)"
            )
        if scope.get("method") not in UNSAFE_METHODS:
            return None
        origin = headers.get(b"origin")
        if origin is not None and not self._same_origin(origin, host):
            return 403, f"cross-origin request from {origin!r} refused"
        if headers.get(b"sec-fetch-site") == "cross-site":
            return 403, "cross-site request refused"
        content_type = headers.get(b"content-type")
        has_body = headers.get(b"content-length", "0") not in ("0", "") or (
            b"transfer-encoding" in headers
        )
        if (content_type is not None and not is_json_type(content_type)) or (
            content_type is None and has_body
        ):
            return 415, (
                f"Content-Type {content_type!r} is not accepted; send the body as application/json"
            )
        return None

    def _same_origin(self, origin: str, host: str) -> bool:
        parts = urlsplit(origin)
        if not parts.netloc:  # "null": a sandboxed frame or a local file
            return False
        return parts.netloc.lower() == host.strip().lower() or (
            (parts.hostname or "") in self.origins
        )


def _nul_refusal(scope: Scope) -> tuple[int, object] | None:
    """404 for a NUL in the path (nothing is stored under such a name), 422 naming the query
    parameter that holds one."""
    if "\x00" in scope.get("path", ""):
        return 404, "Not Found"
    query = scope.get("query_string", b"")
    if b"%00" not in query and b"\x00" not in query:
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            error = {
                "loc": ["query", name.replace("\x00", "")],
                "msg": "a NUL character is not valid here",
                "type": "value_error",
            }
            return 422, [error]
    return None
