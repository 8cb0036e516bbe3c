"""External tools the integration tests drive (prometheus, docker-compose).

A missing tool fails the test with a clear message, so CI never passes by skipping; a
developer without the tool sets RANKGUARD_ALLOW_MISSING_TOOLS=1 to skip instead.
"""

from __future__ import annotations

import os
import shutil

import pytest

ALLOW_MISSING = "RANKGUARD_ALLOW_MISSING_TOOLS"


def require_tool(name: str, *, env_override: str | None = None, hint: str = "") -> str:
    """Path of executable `name` (or of the path in `env_override`), else fail or skip."""
    path = os.environ.get(env_override) if env_override else None
    found = path if path and os.access(path, os.X_OK) else shutil.which(name)
    if found:
        return found
    message = f"{name!r} is not installed (not on PATH"
    message += f" and {env_override} unset)" if env_override else ")"
    message += f"; {hint}" if hint else ""
    if os.environ.get(ALLOW_MISSING) == "1":
        pytest.skip(f"{message}; skipped because {ALLOW_MISSING}=1")
    pytest.fail(f"{message}. Install it, or set {ALLOW_MISSING}=1 to skip.", pytrace=False)
