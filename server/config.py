"""Server settings: environment variables with the prefix ``RANKGUARD_`` and CLI flags.

``create_app(settings)`` takes a ``Settings`` object, so tests build one directly and the
environment is read only by ``get_settings()`` (the CLI) and never inside the app.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIB = 1024 * 1024
# An admin token shorter than this is refused at start: it would be guessable.
MIN_ADMIN_TOKEN_LEN = 32
LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "::1")


def _csv(value: object) -> object:
    """Lists from the environment as comma-separated text ("a,b"), or JSON lists."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def is_loopback_host(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the server reads from its environment, validated once at start."""

    model_config = SettingsConfigDict(
        env_prefix="RANKGUARD_", env_nested_delimiter="__", extra="ignore"
    )

    database_url: str = "sqlite:///./rankguard.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Caps the request body as sent and, for gzip bodies, as decompressed (a zip bomb is
    # refused with 413 after at most this many bytes were inflated).
    max_body_bytes: int = Field(default=16 * MIB, ge=1024)
    no_auth: bool = False
    # --no-auth on a non-loopback bind opens the database to the network; it needs this too.
    force_no_auth: bool = False
    admin_token: SecretStr | None = None
    default_project: str = Field(default="default", min_length=1, max_length=128)
    # Connection pool: a burst of probes beyond pool_size + max_overflow waits pool_timeout_s,
    # then gets 503 with Retry-After; committed data is never lost.
    pool_size: int = Field(default=8, ge=1)
    max_overflow: int = Field(default=8, ge=0)
    pool_timeout_s: float = Field(default=10.0, gt=0)
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)
    # queued/delivered commands older than this are expired on the next claim or read.
    command_ttl_s: float = Field(default=3600.0, gt=0)
    migrate_on_start: bool = True
    retry_after_s: int = Field(default=1, ge=1)

    # --- alerting (server/alerts/service.py, server/notify/worker.py) ---
    # false: rules are still installed and editable, but ingest evaluates none of them.
    alerts_enabled: bool = True
    # The dashboard's public address (https://rg.example); alert payloads link to it.
    public_base_url: str | None = None
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=5, ge=1)
    webhook_max_total_s: float = Field(default=60.0, gt=0)
    # Threads sending webhooks; a receiver has at most one delivery in flight, so a slow one
    # holds one thread and never delays the others (server/notify/worker.py).
    webhook_workers: int = Field(default=8, ge=1, le=256)
    # Pending deliveries are also picked up on this period (e.g. written by another worker).
    delivery_poll_s: float = Field(default=2.0, gt=0)
    # Webhook receivers on private, loopback, link-local, CGNAT, multicast or metadata
    # addresses are refused unless one of these networks holds them ("10.0.0.0/8,127.0.0.1/32").
    webhook_allow: Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode] = Field(
        default_factory=list
    )
    # POST /webhooks/{id}/test runs on its own few threads, never the request pool; more tests
    # than this waiting at once are refused with 429.
    webhook_test_workers: int = Field(default=2, ge=1, le=32)
    webhook_test_queue: int = Field(default=8, ge=0, le=1000)

    # --- hardening (server/guard.py, server/secrets.py) ---
    # The Host header must name one of these (port ignored): a DNS-rebinding page reaches the
    # server under its own name and is refused. Empty: the bind address and localhost names
    # (and the machine's own names on a 0.0.0.0 / :: bind). "*" allows any host.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # /metrics needs 'Authorization: Bearer <token>': this static token (the one Prometheus
    # holds in docker compose) or an API token with the 'metrics' scope. metrics_open serves
    # it to anyone, as before.
    metrics_token: SecretStr | None = None
    metrics_open: bool = False
    # Webhook secrets are encrypted at rest (Fernet) with this key; without it the key lives
    # in secret_key_file, created on first start (default: beside the SQLite database, or
    # ./rankguard.key for other databases). Every server process of a database needs the same.
    secret_key: SecretStr | None = None
    secret_key_file: str | None = None

    @field_validator("webhook_allow", "allowed_hosts", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return _csv(value)

    @field_validator("admin_token")
    @classmethod
    def _long_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_TOKEN_LEN:
            raise ValueError(
                f"admin_token has {len(value.get_secret_value())} characters; use at least "
                f"{MIN_ADMIN_TOKEN_LEN} (e.g. openssl rand -hex 32)"
            )
        return value

    @model_validator(mode="after")
    def _no_auth_needs_loopback(self) -> Settings:
        if self.no_auth and not self.force_no_auth and not is_loopback_host(self.host):
            raise ValueError(
                f"no_auth=True with host={self.host!r} would serve every run without a token "
                "to the network; bind a loopback address (127.0.0.1, ::1, localhost) or also "
                "set force_no_auth (--force-no-auth)"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def trusted_hosts(self) -> frozenset[str] | None:
        """Host names the Host header may carry (lower case, no port); None: any."""
        if "*" in self.allowed_hosts:
            return None
        if self.allowed_hosts:
            return frozenset(h.lower().strip("[]") for h in self.allowed_hosts)
        names = {self.host.lower().strip("[]"), *LOCAL_HOST_NAMES}
        if self.host in ("0.0.0.0", "::", ""):
            import socket

            names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
        return frozenset(names)


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment (used by the CLI; the app receives them injected)."""
    return Settings()
