"""Server settings: environment variables with the prefix ``RANKGUARD_`` and CLI flags.

``create_app(settings)`` takes a ``Settings`` object, so tests build one directly and the
environment is read only by ``get_settings()`` (the CLI) and never inside the app.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


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
    # Concurrent deliveries: one slow receiver must not hold back the others.
    webhook_workers: int = Field(default=4, ge=1)
    # Pending deliveries are also picked up on this period (e.g. written by another worker).
    delivery_poll_s: float = Field(default=2.0, gt=0)
    # /metrics is open by default (Prometheus scrapes it without a token, as docker compose
    # does); set this to require 'Authorization: Bearer <metrics_token>' on it.
    metrics_token: SecretStr | None = None

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


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment (used by the CLI; the app receives them injected)."""
    return Settings()
