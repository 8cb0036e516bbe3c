"""Webhook secrets at rest. A webhook's secret signs its bodies (HMAC), so the server must be
able to read it back: it cannot be hashed like a token. It is stored encrypted with Fernet
(AES-128-CBC with an HMAC-SHA256 tag, from ``cryptography``) under the server's key, so a
copy of the database alone (a backup, a dump, a stolen disk) does not give the secrets away.

The key: ``RANKGUARD_SECRET_KEY`` (a Fernet key: 32 url-safe base64 bytes), else the file
``RANKGUARD_SECRET_KEY_FILE``, else a file beside the SQLite database (``<db>.key``) or
``./rankguard.key`` for other databases, created with mode 0600 on the first start. Every
server process of one database needs the same key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from rankguard.server.config import Settings
from rankguard.server.models import Webhook

PREFIX = "fernet:"


class SecretUnavailable(RuntimeError):
    """A stored secret cannot be decrypted with this server's key (the key changed)."""


class SecretBox:
    """Seals secrets for the database and opens them for signing."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def seal(self, secret: str) -> str:
        return PREFIX + self._fernet.encrypt(secret.encode("utf-8")).decode("ascii")

    def open(self, stored: str | None) -> str | None:
        """The secret in clear; a value without the prefix predates encryption and is used as
        it is until ``seal_plain_secrets`` rewrites it."""
        if stored is None or not stored.startswith(PREFIX):
            return stored
        try:
            return self._fernet.decrypt(stored[len(PREFIX) :].encode("ascii")).decode("utf-8")
        except (InvalidToken, ValueError) as exc:
            raise SecretUnavailable(
                "the webhook secret cannot be decrypted with this server's key "
                "(RANKGUARD_SECRET_KEY changed?); set the secret again"
            ) from exc


def key_file(settings: Settings) -> Path:
    if settings.secret_key_file:
        return Path(settings.secret_key_file)
    if settings.is_sqlite:
        database = make_url(settings.database_url).database or "rankguard.db"
        return Path(database + ".key")
    return Path("rankguard.key")


def load_key(settings: Settings) -> bytes:
    """The server's key: from the settings, else its file (created on the first start)."""
    if settings.secret_key is not None:
        key = settings.secret_key.get_secret_value().encode("ascii")
        Fernet(key)  # raises ValueError for a key that is not 32 url-safe base64 bytes
        return key
    path = key_file(settings)
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    key = Fernet.generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this server created it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


def seal_plain_secrets(*, session: Session, box: SecretBox) -> int:
    """Encrypts the secrets stored in clear by an earlier version; returns how many."""
    hooks = session.scalars(
        select(Webhook).where(Webhook.secret.is_not(None), Webhook.secret.not_like(PREFIX + "%"))
    ).all()
    for hook in hooks:
        assert hook.secret is not None
        hook.secret = box.seal(hook.secret)
    return len(hooks)


__all__ = ["SecretBox", "SecretUnavailable", "key_file", "load_key", "seal_plain_secrets"]
