"""The wire contract (pydantic v2). ``docs/contract.md`` describes it for people.

Parsing is strict where the contract is: a float field takes a JSON number or exactly one of
the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (not "nan", "inf" or "1.5"); an integer
field takes a JSON integer (not "7", 7.0 or 1e3). ``WireJSONResponse`` writes non-finite
floats back as those strings. Strings refuse NUL characters because PostgreSQL text cannot
hold them; free-form objects (run config, event payload, command args) are checked by
``wire.free_form`` (64-bit integers, no NUL or lone surrogate, bounded nesting).

The commands an operator may order, one model per kind, are in ``server/commands.py``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from rankguard.server.models import Scope
from rankguard.server.vocab import (
    AlertSeverity,
    CommandKind,
    CommandState,
    RunStatus,
    WebhookFormat,
)
from rankguard.server.wire import decode_float, decode_floats, free_form

NON_FINITE_STRINGS = ("NaN", "Infinity", "-Infinity")
# JSON integers a client can hold exactly (2**53), and far below SQLite's int64 range.
MAX_STEP = 2**53

_WIRE_FLOAT_SCHEMA = {"anyOf": [{"type": "number"}, {"enum": list(NON_FINITE_STRINGS)}]}
# A number (strict: no numeric strings) or one of the contract's strings, still undecoded:
# pydantic-core matches it without a Python call per item (the ingest hot path).
RawWireFloat = Annotated[float, Strict()] | Literal["NaN", "Infinity", "-Infinity"]
if TYPE_CHECKING:  # what the validators below return
    WireFloat = float
    WireFloats = list[float]
else:
    WireFloat = Annotated[
        RawWireFloat, AfterValidator(decode_float), WithJsonSchema(_WIRE_FLOAT_SCHEMA)
    ]
    # A column of wire floats, decoded in one pass after validation.
    WireFloats = Annotated[
        list[RawWireFloat],
        AfterValidator(decode_floats),
        WithJsonSchema({"type": "array", "items": _WIRE_FLOAT_SCHEMA}),
    ]
# Seconds since the epoch, as a number: a time cannot be NaN.
WallTime = Annotated[float, Strict(), Field(ge=0, le=1e11, allow_inf_nan=False)]
StrictInt = Annotated[int, Strict()]
Name = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00]+$")]
QuantityName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00]+$")]
Text = Annotated[str, StringConstraints(max_length=10_000, pattern=r"^[^\x00]*$")]
ProjectName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
]
Step = Annotated[int, Strict(), Field(ge=0, le=MAX_STEP)]
# A free-form JSON object from a client (run config, event payload, command args and result).
# A bare NaN/Infinity token, which Python's json writes and reads, is stored as the contract's
# string: a JSON column cannot hold the token (PostgreSQL refuses it, orjson writes null).
WireObject = Annotated[dict[str, Any], AfterValidator(free_form)]
Rank = Annotated[int, Strict(), Field(ge=0, le=1_000_000)]
RunId = Annotated[str, StringConstraints(min_length=1, max_length=36, pattern=r"^[^\x00]+$")]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


# --- projects ---------------------------------------------------------------------------


class ProjectCreate(WireModel):
    name: ProjectName


class ProjectPublic(WireModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    created_at: dt.datetime


class ProjectsPublic(WireModel):
    data: list[ProjectPublic]
    count: int


# --- tokens -----------------------------------------------------------------------------


class TokenCreate(WireModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]
    project: ProjectName = Field(description="name of the project the token is bound to")
    scopes: list[Scope] = Field(min_length=1, max_length=len(Scope))
    run_id: RunId | None = Field(
        default=None,
        description="scope 'job' only: the run the token is bound to; without it the token "
        "is bound to the first run it registers",
    )

    @model_validator(mode="after")
    def _job_scope_alone(self) -> TokenCreate:
        if Scope.JOB in self.scopes and len(set(self.scopes)) > 1:
            raise ValueError("scopes: 'job' cannot be combined with other scopes")
        if self.run_id is not None and Scope.JOB not in self.scopes:
            raise ValueError("run_id: only a token with the 'job' scope is bound to a run")
        return self


class TokenPublic(WireModel):
    id: int
    name: str
    prefix: str
    project: str | None = Field(description="null: the bootstrap admin token (all projects)")
    scopes: list[Scope]
    run_id: str | None = Field(default=None, description="a job token's run")
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="the secret; shown once, only its hash is stored")


class TokensPublic(WireModel):
    data: list[TokenPublic]
    count: int


# --- runs -------------------------------------------------------------------------------


class ParameterInfo(WireModel):
    name: Name
    shape: list[Annotated[int, Strict(), Field(ge=0, le=2**40)]] = Field(max_length=16)


class RunCreate(WireModel):
    id: uuid.UUID | None = Field(
        default=None, description="client-chosen id; registering it again returns the run"
    )
    name: Name
    project: ProjectName | None = Field(
        default=None, description="project name; defaults to the token's project"
    )
    config: WireObject = Field(default_factory=dict)
    world_size: StrictInt = Field(default=1, ge=1, le=1_000_000)
    parameters: list[ParameterInfo] = Field(default_factory=list)


class RunPublic(WireModel):
    id: str
    name: str
    project: str
    config: dict[str, Any]
    parameters: list[dict[str, Any]]
    world_size: int
    status: RunStatus
    created_at: dt.datetime
    finished_at: dt.datetime | None
    last_step: int | None


class RunRegistered(RunPublic):
    job_token: str | None = Field(
        default=None,
        description="a new run registered with a project token: the secret of a token bound "
        "to this run alone (scope 'job'), shown once; the job uses it from here on",
    )


class RunsPublic(WireModel):
    data: list[RunPublic]
    count: int


class RunFinish(WireModel):
    status: Literal[RunStatus.FINISHED, RunStatus.FAILED] = RunStatus.FINISHED


# --- points, series, histograms ---------------------------------------------------------


class PointsBatch(WireModel):
    """Columnar batch: all arrays the same length; ``rank`` -> 0, ``wall_time`` -> now."""

    quantity: list[QuantityName]
    target: list[Name]
    rank: list[Rank] | None = None
    step: list[Step]
    wall_time: list[WallTime] | None = None
    value: WireFloats


class IngestResult(WireModel):
    received: int = Field(description="points in the request")
    inserted: int = Field(description="points that were new (a replay inserts 0)")


class SeriesIndexEntry(WireModel):
    quantity: str
    target: str
    rank: int
    count: int
    first_step: int | None
    last_step: int | None


class SeriesIndex(WireModel):
    series: list[SeriesIndexEntry]


class SeriesData(WireModel):
    quantity: str
    target: str
    rank: int
    steps: list[int]
    values: WireFloats
    wall_times: WireFloats
    total: int = Field(description="points in the requested step range before downsampling")
    downsampled: bool


class SeriesResponse(WireModel):
    series: list[SeriesData]


class HistogramIn(WireModel):
    quantity: QuantityName
    target: Name
    rank: Rank = 0
    step: Step
    wall_time: WallTime | None = None
    edges: WireFloats = Field(min_length=2, max_length=10_001)
    counts: WireFloats = Field(min_length=1, max_length=10_000)


class HistogramsBatch(WireModel):
    histograms: list[HistogramIn] = Field(max_length=100_000)


class HistogramPublic(WireModel):
    quantity: str
    target: str
    rank: int
    step: int
    wall_time: WireFloat
    edges: WireFloats
    counts: WireFloats


class HistogramsPublic(WireModel):
    histograms: list[HistogramPublic]


# --- events -----------------------------------------------------------------------------


class EventCreate(WireModel):
    kind: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00]+$")]
    step: Step | None = None
    payload: WireObject = Field(default_factory=dict)


class EventPublic(WireModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    run_id: str
    step: int | None
    kind: str
    payload: dict[str, Any]
    created_at: dt.datetime


class EventsPublic(WireModel):
    data: list[EventPublic]
    count: int


# --- commands ---------------------------------------------------------------------------


class CommandPublic(WireModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    run_id: str
    kind: CommandKind
    args: dict[str, Any]
    state: CommandState
    result: dict[str, Any] | None
    error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime
    applied_step: int | None
    created_by: str


class CommandsPublic(WireModel):
    data: list[CommandPublic]
    count: int


class CommandClaim(WireModel):
    limit: StrictInt = Field(default=100, ge=1, le=1000)


class CommandAck(WireModel):
    state: Literal[CommandState.APPLIED, CommandState.FAILED]
    step: Step | None = None
    result: WireObject | None = None
    error: Text | None = None


# --- alerting: rules, alerts, webhooks, inbound -----------------------------------------


class AlertRuleCreate(WireModel):
    """A rule (the fields of ``alerts.Rule``: name, quantity, condition, threshold,
    targets, aggregation, ...; validated by the engine) for a project or one of its runs."""

    rule: WireObject
    run_id: RunId | None = Field(
        default=None, description="attach to this run; null: a project rule, copied to new runs"
    )
    project: ProjectName | None = Field(
        default=None, description="project name; defaults to the token's project"
    )


class AlertRuleUpdate(WireModel):
    """Fields of the rule to change (PATCH); a change of its condition resets its state."""

    rule: WireObject


class AlertRulePublic(WireModel):
    id: int
    project: str
    run_id: str | None
    name: str
    quantity: str
    rule: dict[str, Any]
    firing: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class AlertRulesPublic(WireModel):
    data: list[AlertRulePublic]
    count: int


class AlertPublic(WireModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    run_id: str
    rule_id: int | None
    rule_name: str
    episode: int
    quantity: str
    severity: str
    state: Literal["firing", "resolved"]
    first_step: int
    fired_step: int
    resolved_step: int | None
    targets: list[dict[str, Any]]
    message: str
    resolved_message: str | None
    suggested_action: str
    command_id: str | None
    command_suppressed: bool
    created_at: dt.datetime
    resolved_at: dt.datetime | None


class AlertsPublic(WireModel):
    data: list[AlertPublic]
    count: int


WebhookUrl = Annotated[
    str, StringConstraints(min_length=8, max_length=2048, pattern=r"^https?://[^\s\x00]+$")
]
WebhookSecret = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00]+$")
]


class WebhookCreate(WireModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]
    url: WebhookUrl
    format: WebhookFormat = WebhookFormat.JSON
    secret: WebhookSecret | None = Field(
        default=None, description="signs each body (HMAC-SHA256); write-only"
    )
    enabled: bool = True
    min_severity: AlertSeverity = AlertSeverity.INFO
    project: ProjectName | None = Field(
        default=None, description="project name; defaults to the token's project"
    )


class WebhookUpdate(WireModel):
    name: (
        Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]
        | None
    ) = None
    url: WebhookUrl | None = None
    format: WebhookFormat | None = None
    secret: WebhookSecret | None = Field(default=None, description="write-only")
    clear_secret: bool = False
    enabled: bool | None = None
    min_severity: AlertSeverity | None = None


class WebhookPublic(WireModel):
    id: int
    project: str
    name: str
    url: str
    format: WebhookFormat
    has_secret: bool
    enabled: bool
    min_severity: AlertSeverity
    created_at: dt.datetime
    updated_at: dt.datetime


class WebhooksPublic(WireModel):
    data: list[WebhookPublic]
    count: int


class WebhookTestResult(WireModel):
    """One synchronous try of a sample notification (``POST /webhooks/{id}/test``)."""

    delivered: bool
    status_code: int | None
    error: str | None
    duration_s: float
    body: dict[str, Any]  # what was sent, as the receiver saw it


class DeliveryPublic(WireModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    webhook_id: int
    alert_id: str
    status: str
    format: str
    outcome: Literal["pending", "sending", "delivered", "failed"]
    attempts: list[dict[str, Any]]
    status_code: int | None
    error: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


class DeliveriesPublic(WireModel):
    data: list[DeliveryPublic]
    count: int


class InboundIgnored(WireModel):
    alertname: str
    reason: str


class InboundResult(WireModel):
    received: int = Field(description="alerts in the payload")
    commands: list[CommandPublic] = Field(description="commands queued by this payload")
    ignored: list[InboundIgnored]


# --- health -----------------------------------------------------------------------------


class Health(WireModel):
    status: Literal["ok"]
