"""``rankguard report``: one self-contained HTML file for a run.

The same figures as the run page (built by ``dashboard.figures`` from the same downsampled
reads), the alerts with their suggested actions, the alert/intervention/command timeline and
the commands. plotly.js and the stylesheet are inlined and the figures embedded as JSON, so
the file opens offline, attached to a ticket or mailed, years later.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from rankguard.dashboard.events import alert_rows, timeline_rows
from rankguard.dashboard.figures.common import figure_json
from rankguard.dashboard.page import build_figures
from rankguard.dashboard.routes import PLOTLY_JS, STATIC_DIR, templates
from rankguard.server.storage.commands import list_commands
from rankguard.server.storage.events import list_events
from rankguard.server.storage.runs import get_run, project_names


class RunNotFoundError(LookupError):
    """No run with that id in the database."""


def _script_safe(text: str) -> str:
    """Text that cannot end or confuse the <script> element it is embedded in ('</script>'
    or '<!--' inside a JSON string); '<\\/' and '<\\!' read back as the same JSON/JS text."""
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def _plotly_js() -> str:
    """The installed plotly.min.js, inlined verbatim: rewriting code is not safe ('</' also
    occurs outside strings there), so refuse a build that could end its <script> early."""
    js = PLOTLY_JS.read_text(encoding="utf-8")
    lowered = js.lower()
    if "</script" in lowered or "<!--" in lowered:
        raise RuntimeError(f"{PLOTLY_JS} contains '</script' or '<!--'; it cannot be inlined")
    return js


def build_report(session: Session, run_id: str) -> str:
    """The report of ``run_id`` as one HTML document (raises RunNotFoundError)."""
    run = get_run(session=session, run_id=run_id, project_id=None)
    if run is None:
        raise RunNotFoundError(f"run_id={run_id!r}: no such run in this database")
    events = list_events(session=session, run_id=run_id, limit=100_000)
    figures = build_figures(session, run, events)
    project = project_names(session=session, ids={run.project_id}).get(run.project_id, "")
    commands = list_commands(session=session, run_id=run_id, limit=10_000)
    return templates.get_template("report.html").render(
        run=run,
        project=project,
        generated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        alerts=alert_rows(events, run_id),
        timeline=timeline_rows(events),
        commands=commands,
        figures=[
            {"id": fig.layout.meta["figure_id"], "json": _script_safe(figure_json(fig))}
            for fig in figures
        ],
        figure_ids=[fig.layout.meta["figure_id"] for fig in figures],
        plotly_js=_plotly_js(),
        css=(STATIC_DIR / "rankguard.css").read_text(encoding="utf-8"),
    )
