"""Data access, one module per domain; every query the server and the dashboard run lives
here. Keyword-only functions (the bulk readers take the session first) over a ``Session``
the caller owns (and commits).

- ``runs``: projects, tokens, runs;
- ``points``: series ids, the ingest hot path and the ``point_blocks`` rollups, a run's
  series, latest values;
- ``downsample``: the one downsampling rule and the reads that use it (API and dashboard);
- ``heatmaps``: series binned to step columns for the dashboard's heatmaps;
- ``histograms``, ``events``: insert and read;
- ``commands``: the probe's command queue (queue, expire, claim, acknowledge, cancel);
- ``alerts``: alert reads and the one count of alerts firing;
- ``webhooks``: outbound webhooks and their delivery log;
- ``fleet``: reads across runs (the runs list in SQL, rule margins, loss sparklines);
- ``overlay``: runs overlaid (a quantity aggregated over its targets);
- ``incidents``: one alert episode's window, before/after values and following commands.

The names of the single ``storage`` module this package replaced are re-exported, so
``storage.<name>`` keeps working; new code imports from the domain module.
"""

from rankguard.server.storage.commands import (
    OPEN_STATES,
    ack_command,
    cancel_command,
    claim_commands,
    enqueue_command,
    expire_commands,
    get_command,
    list_commands,
)
from rankguard.server.storage.downsample import read_points
from rankguard.server.storage.errors import ConflictError
from rankguard.server.storage.events import create_event, list_events
from rankguard.server.storage.histograms import insert_histograms, read_histograms
from rankguard.server.storage.points import (
    ColumnarPoints,
    SeriesKey,
    insert_points,
    match_series,
    resolve_series,
    series_index,
)
from rankguard.server.storage.runs import (
    create_token,
    ensure_admin_token,
    ensure_project,
    find_token,
    finish_run,
    get_project,
    get_run,
    list_projects,
    list_runs,
    list_tokens,
    project_names,
    register_run,
    revoke_token,
)

__all__ = [
    "OPEN_STATES",
    "ColumnarPoints",
    "ConflictError",
    "SeriesKey",
    "ack_command",
    "cancel_command",
    "claim_commands",
    "create_event",
    "create_token",
    "enqueue_command",
    "ensure_admin_token",
    "ensure_project",
    "expire_commands",
    "find_token",
    "finish_run",
    "get_command",
    "get_project",
    "get_run",
    "insert_histograms",
    "insert_points",
    "list_commands",
    "list_events",
    "list_projects",
    "list_runs",
    "list_tokens",
    "match_series",
    "project_names",
    "read_histograms",
    "read_points",
    "register_run",
    "resolve_series",
    "revoke_token",
    "series_index",
]
