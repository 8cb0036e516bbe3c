"""ORM tables (SQLAlchemy 2, typed ``Mapped``). Relationships are ``lazy="raise"``: every
load is explicit in ``storage``, so no request issues a hidden query per row.

Points are the bulk of the data and are written with core ``INSERT ... ON CONFLICT DO
NOTHING`` (see ``storage.insert_points``), never through the ORM unit of work.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from rankguard.server.db import Base, FloatValue, UTCDateTime, utcnow
from rankguard.server.vocab import AlertState, CommandState, DeliveryOutcome, RunStatus

NAME_LEN = 255
BLOCK = 64  # steps per PointBlock


class Scope(str, Enum):
    INGEST = "ingest"
    READ = "read"
    OPERATE = "operate"
    ADMIN = "admin"
    # A training job's token: bound to one run (``Token.run_id``), whose points it ingests,
    # whose commands it claims and acknowledges and which it finishes; nothing else.
    JOB = "job"
    # Reads /metrics (Prometheus).
    METRICS = "metrics"


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Token(Base):
    """A bearer token: only its sha256 is stored; ``prefix`` identifies it in listings. A job
    token (scope ``job``) is bound to ``run_id``; minted without one, it is bound to the
    first run it registers."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # NULL project: the bootstrap admin token, valid for every project.
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    run_id: Mapped[str | None] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    project: Mapped[Project | None] = relationship(lazy="raise")


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    parameters: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    world_size: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.RUNNING.value)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_step: Mapped[int | None] = mapped_column(BigInteger)

    project: Mapped[Project] = relationship(lazy="raise")

    __table_args__ = (Index(None, "project_id", "created_at"),)


class Series(Base):
    """One (run, quantity, target, rank) time series; points and histograms hang off it."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    quantity: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(NAME_LEN))
    rank: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (UniqueConstraint("run_id", "quantity", "target", "rank"),)


class Point(Base):
    __tablename__ = "points"

    # The primary key is the read key: a series' points are one contiguous index range.
    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    wall_time: Mapped[float] = mapped_column(Double)
    # nullable only because SQLite keeps NaN as NULL (db.FloatValue); no other NULL exists.
    value: Mapped[float] = mapped_column(FloatValue(), nullable=True)

    # SQLite: cluster the rows on the primary key, so a series is one contiguous b-tree range
    # and each insert writes one b-tree instead of a table plus an index.
    __table_args__ = ({"sqlite_with_rowid": False},)


class PointBlock(Base):
    """Rollup of the points of one series in steps [block * BLOCK, (block + 1) * BLOCK):
    count, the min and max point (NaN excluded) and the first NaN step. Maintained at ingest
    from the rows actually inserted, so replays leave it unchanged; downsampled reads scan
    these (1/BLOCK of the rows) instead of the points."""

    __tablename__ = "point_blocks"

    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), primary_key=True
    )
    block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    min_step: Mapped[int | None] = mapped_column(BigInteger)
    min_value: Mapped[float | None] = mapped_column(Double)
    max_step: Mapped[int | None] = mapped_column(BigInteger)
    max_value: Mapped[float | None] = mapped_column(Double)
    nan_step: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = ({"sqlite_with_rowid": False},)


class Histogram(Base):
    __tablename__ = "histograms"

    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    wall_time: Mapped[float] = mapped_column(Double)
    edges: Mapped[list[float]] = mapped_column(JSON)
    counts: Mapped[list[float]] = mapped_column(JSON)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (Index(None, "run_id", "step"),)


class Command(Base):
    __tablename__ = "commands"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default=CommandState.QUEUED.value)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    applied_step: Mapped[int | None] = mapped_column(BigInteger)
    created_by: Mapped[str] = mapped_column(String(NAME_LEN))

    __table_args__ = (Index(None, "run_id", "state"),)


# --- alerting (server/alerts/) --------------------------------------------------------------


class AlertRule(Base):
    """One alert rule (``alerts.Rule.to_dict()`` in ``rule``). ``run_id`` NULL: a
    project-level rule, copied into each new run of the project; otherwise the rule of one
    run, with the engine's state for that (rule, run) in ``state``."""

    __tablename__ = "alert_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    # Copied from rule["quantity"]: ingest loads only the rules of the batch's quantities.
    quantity: Mapped[str] = mapped_column(String(64))
    rule: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        Index(None, "run_id", "quantity"),
        Index(None, "project_id", "run_id"),
    )


class Alert(Base):
    """One firing episode of a (rule, run): created when it fires, updated when it resolves."""

    __tablename__ = "alerts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    # NULL once the rule is deleted: the alert stays in the history.
    rule_id: Mapped[int | None] = mapped_column(ForeignKey("alert_rules.id", ondelete="SET NULL"))
    rule_name: Mapped[str] = mapped_column(String(NAME_LEN))
    episode: Mapped[int] = mapped_column(Integer)
    quantity: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=AlertState.FIRING.value)
    first_step: Mapped[int] = mapped_column(BigInteger)
    fired_step: Mapped[int] = mapped_column(BigInteger)
    resolved_step: Mapped[int | None] = mapped_column(BigInteger)
    targets: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    message: Mapped[str] = mapped_column(Text)
    resolved_message: Mapped[str | None] = mapped_column(Text)
    suggested_action: Mapped[str] = mapped_column(Text)
    command_id: Mapped[str | None] = mapped_column(String(36))
    command_suppressed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        UniqueConstraint("rule_id", "episode"),
        Index(None, "run_id", "created_at"),
        Index(None, "state"),
    )


class Webhook(Base):
    """An outbound webhook of a project. ``secret`` signs the bodies (HMAC), so it cannot be
    hashed: it is stored encrypted with the server's key (``server/secrets.py``) and the API
    never returns it."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(String(2048))
    format: Mapped[str] = mapped_column(String(16))
    secret: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # Notify only for alerts of at least this severity (info < warning < critical).
    min_severity: Mapped[str] = mapped_column(String(16), default="info")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Delivery(Base):
    """One notification of one alert transition to one webhook: the outbox row the delivery
    worker picks up (``pending``) and, once sent, the log of its attempts."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(
        ForeignKey("webhooks.id", ondelete="CASCADE"), index=True
    )
    alert_id: Mapped[str] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))  # the alert transition: firing | resolved
    format: Mapped[str] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16), default=DeliveryOutcome.PENDING.value)
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index(None, "outcome", "id"),)
