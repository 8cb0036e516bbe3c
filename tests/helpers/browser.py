"""Headless Chromium for the page tests: where it is, how it is launched, the token prompt,
and the Content-Security-Policy the server sends (server/middleware: every response), which
``with_csp`` puts on each page so that a script or handler it would block fails the test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("RANKGUARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright ``Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def login(page: Any, token: str) -> None:
    page.wait_for_selector("#token-input", state="visible", timeout=15_000)
    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")


def wait_rendered(page: Any) -> None:
    # A function, not an expression: Playwright evaluates an expression with eval(), which
    # the CSP refuses.
    page.wait_for_function("() => window.__rankguardRendered === true", timeout=60_000)


def with_csp(page: Any) -> list[str]:
    """Serves every response to ``page`` with the server's CSP header (set here until the
    server sends it itself) and returns the list its violations are collected in, with any
    console error that is not a refused request (4xx)."""
    problems: list[str] = []

    def handle(route: Any) -> None:
        # Only documents carry a CSP that applies; anything else goes straight through (a
        # proxied figure payload would slow every poll of a page under a loaded machine).
        if route.request.resource_type != "document":
            route.continue_()
            return
        response = route.fetch()
        headers = {**response.headers, "content-security-policy": CSP}
        route.fulfill(response=response, headers=headers)

    page.route("**/*", handle)
    page.on(
        "console",
        lambda m: (
            problems.append(m.text) if m.type == "error" and "status of 40" not in m.text else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems
