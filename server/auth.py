"""Bearer tokens: generation, hashing at rest, scopes and the request's principal.

Tokens are 32 random bytes (urlsafe base64) behind a ``rg_`` marker. A high-entropy secret
needs no slow KDF: sha256 is one-way for it, and lookup is a unique-index equality on the
hash, so verification costs one indexed read and leaks no timing about other tokens.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from rankguard.server.models import Scope

TOKEN_MARKER = "rg_"
PREFIX_LEN = 10


def generate_token() -> str:
    return TOKEN_MARKER + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_prefix(token: str) -> str:
    """The first characters, stored for display so an operator can tell tokens apart."""
    return token[:PREFIX_LEN]


def expand_scopes(scopes: frozenset[Scope]) -> frozenset[Scope]:
    """admin implies every scope but job; operate implies read; job implies ingest (on its
    own run only: ``Principal.run_bound``)."""
    if Scope.ADMIN in scopes:
        return frozenset(Scope) - {Scope.JOB}
    if Scope.OPERATE in scopes:
        return scopes | {Scope.READ}
    if Scope.JOB in scopes:
        return frozenset({Scope.JOB, Scope.INGEST})
    return scopes


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's effective scopes, the project it is bound to and, for a job
    token, its run (None until the token registered one)."""

    token_id: int | None
    project_id: int | None  # None: every project (bootstrap admin token, --no-auth)
    scopes: frozenset[Scope]
    label: str  # recorded as commands.created_by
    run_id: str | None = None

    @property
    def run_bound(self) -> bool:
        """A job token: it may act on its own run and on no other."""
        return Scope.JOB in self.scopes

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes

    def can_access(self, project_id: int) -> bool:
        return self.project_id is None or self.project_id == project_id

    def can_access_run(self, run_id: str, project_id: int) -> bool:
        if self.run_bound and run_id != self.run_id:
            return False
        return self.can_access(project_id)
