"""Reads across many runs, for the runs page and ``/metrics``: the runs list filtered, sorted
and paged in SQL; each run's rules with their margins (``alerts.margin``) from one read of the
rules and one of the latest values; loss sparklines from one bulk read.

Tags are ``config["tags"]`` (a list of strings given when the run is registered), filtered in
SQL with each dialect's JSON functions.

Cost model (per request, whatever the number of runs): the page is one statement, its count
another; margins read the runs' rule rows (engine state included: O(targets) each) and one
point per series of the rules' quantities (a PK seek each); sparklines read the rollup rows of
the runs' loss series (1/BLOCK of the points), plus the points of the short ones.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Select, Text, and_, cast, exists, func, not_, or_, select, text
from sqlalchemy.orm import Session

from rankguard.server.alerts.margin import Margin, needs_state, rule_margin
from rankguard.server.alerts.rules import Rule, RuleError
from rankguard.server.models import Alert, AlertRule, Project, Run, Series
from rankguard.server.storage._arrays import series_slices
from rankguard.server.storage._sql import chunks, fetch_tuples, id_list
from rankguard.server.storage.downsample import Steps, Values, downsample
from rankguard.server.vocab import AlertState, RunStatus

# The sort keys the runs list takes in SQL ("risk" is sorted by the caller, from margins).
SQL_SORTS = ("started", "name", "last_step", "status", "firing")


@dataclass(frozen=True)
class RunFilter:
    """What the runs list shows. ``project_id``: the caller's project (None: every project,
    an admin token); the other fields are the page's filters (None or "": no filter)."""

    project_id: int | None = None
    project: str | None = None
    search: str | None = None
    status: RunStatus | None = None
    firing: bool | None = None
    tag: str | None = None


@dataclass(frozen=True)
class RunRow:
    """One run of the list, without its config (a probe's lists every target name)."""

    id: str
    name: str
    project: str
    status: str
    created_at: dt.datetime
    finished_at: dt.datetime | None
    last_step: int | None
    alerts_firing: int
    tags: tuple[str, ...]


def _firing_count() -> Any:
    return (
        select(func.count())
        .where(Alert.run_id == Run.id, Alert.state == AlertState.FIRING.value)
        .correlate(Run)
        .scalar_subquery()
    )


def _has_tag(session: Session, tag: str) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return text(
            "(CAST(runs.config AS jsonb) -> 'tags') @> jsonb_build_array(CAST(:tag AS text))"
        ).bindparams(tag=tag)
    # json_each of a scalar yields the scalar: only a list counts as tags (as on PostgreSQL).
    return text(
        "json_type(runs.config, '$.tags') = 'array' AND EXISTS "
        "(SELECT 1 FROM json_each(runs.config, '$.tags') AS t WHERE t.value = :tag)"
    ).bindparams(tag=tag)


def _like(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _filtered(session: Session, f: RunFilter, columns: Sequence[Any]) -> Select[Any]:
    query = select(*columns).join(Project, Project.id == Run.project_id)
    if f.project_id is not None:
        query = query.where(Run.project_id == f.project_id)
    if f.project:
        query = query.where(Project.name == f.project)
    if f.search:
        pattern = _like(f.search)
        query = query.where(
            or_(Run.name.ilike(pattern, escape="\\"), Run.id.startswith(f.search, autoescape=True))
        )
    if f.status is not None:
        query = query.where(Run.status == f.status.value)
    if f.firing is not None:
        firing = exists().where(Alert.run_id == Run.id, Alert.state == AlertState.FIRING.value)
        query = query.where(firing if f.firing else not_(firing))
    if f.tag:
        query = query.where(_has_tag(session, f.tag))
    return query


def _tags(config_tags: Any) -> tuple[str, ...]:
    if isinstance(config_tags, list):
        return tuple(t for t in config_tags if isinstance(t, str))
    return ()


def list_run_rows(
    session: Session, f: RunFilter, *, sort: str, descending: bool, limit: int, offset: int
) -> tuple[list[RunRow], int]:
    """One page of the runs that pass ``f``, sorted by a ``SQL_SORTS`` key (ties: newest
    first), and how many pass. The page's ids are found first and only their rows are
    built (SQLite would compute every listed column of every run before sorting)."""
    if sort not in SQL_SORTS:
        raise ValueError(f"sort={sort!r} is not valid; use one of {', '.join(SQL_SORTS)}")
    key: Any = {
        "started": Run.created_at,
        "name": Run.name,
        "last_step": func.coalesce(Run.last_step, -1),
        "status": Run.status,
        "firing": _firing_count(),
    }[sort]
    order = [key.desc() if descending else key.asc(), Run.created_at.desc(), Run.id]
    page = _filtered(session, f, [Run.id]).order_by(*order).limit(limit).offset(offset)
    return run_rows_by_id(session, f, list(session.scalars(page))), count_runs(session, f)


def count_runs(session: Session, f: RunFilter) -> int:
    query = _filtered(session, f, [Run.id])
    return int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)


def run_rows_by_id(session: Session, f: RunFilter, ids: Sequence[str]) -> list[RunRow]:
    """The rows of ``ids`` that pass ``f``, in the order of ``ids``."""
    firing = _firing_count().label("firing")
    columns = (Run.id, Run.name, Project.name, Run.status, Run.created_at, Run.finished_at,
               Run.last_step, firing, Run.config["tags"])  # fmt: skip
    found: dict[str, RunRow] = {}
    for chunk in chunks(list(ids)):
        for i, n, p, s, c, fin, last, fire, tg in session.execute(
            _filtered(session, f, columns).where(Run.id.in_(list(chunk)))
        ):
            found[i] = RunRow(i, n, p, s, c, fin, last, int(fire or 0), _tags(tg))
    return [found[i] for i in ids if i in found]


def run_marks(session: Session, f: RunFilter) -> list[tuple[str, str, int | None, int]]:
    """(id, status, last_step, alerts firing) of every run that passes ``f``: what a sort by
    risk needs to find (or reuse) each run's margins."""
    query = _filtered(session, f, (Run.id, Run.status, Run.last_step, _firing_count()))
    return [(i, s, last, int(n or 0)) for i, s, last, n in session.execute(query)]


def tag_names(session: Session, project_id: int | None, limit: int = 200) -> list[str]:
    """The distinct tags of the runs a caller can see (the filter's choices)."""
    where = "" if project_id is None else f"AND runs.project_id = {int(project_id)}"
    if session.get_bind().dialect.name == "postgresql":
        sql = (
            "SELECT DISTINCT t FROM runs, jsonb_array_elements_text(CASE WHEN "
            "jsonb_typeof(CAST(runs.config AS jsonb) -> 'tags') = 'array' THEN "
            "CAST(runs.config AS jsonb) -> 'tags' ELSE '[]'::jsonb END) AS t "
            f"WHERE TRUE {where} ORDER BY 1 LIMIT {int(limit)}"
        )
    else:
        sql = (
            "SELECT DISTINCT t.value FROM runs, json_each(runs.config, '$.tags') AS t "
            "WHERE json_type(runs.config, '$.tags') = 'array' AND t.type = 'text' "
            f"{where} ORDER BY 1 LIMIT {int(limit)}"
        )
    return [str(r[0]) for r in session.execute(text(sql))]


def project_choices(session: Session, project_id: int | None) -> list[str]:
    query = select(Project.name).order_by(Project.name)
    if project_id is not None:
        query = query.where(Project.id == project_id)
    return list(session.scalars(query))


# --- margins -------------------------------------------------------------------------------

# Parsed rules by their stored JSON text: Rule.from_dict validates every field (~0.1 ms), and
# runs of one model share their rules' text (the default pack, specialised alike), so a fleet
# of a thousand runs parses a handful. Bounded: dropped whole when full.
_PARSED: dict[str, Rule] = {}
_PARSED_MAX = 10_000


def _parsed(raw: str) -> Rule:
    rule = _PARSED.get(raw)
    if rule is None:
        rule = Rule.from_dict(json.loads(raw))
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[raw] = rule
    return rule


def rules_marks(session: Session, run_ids: Sequence[str]) -> dict[str, tuple[int, Any]]:
    """(number of rules, newest edit) per run: with the run's last step and status, what a
    cached margin is keyed on."""
    out: dict[str, tuple[int, Any]] = {}
    for chunk in chunks(list(run_ids)):
        for run_id, n, newest in session.execute(
            select(AlertRule.run_id, func.count(), func.max(AlertRule.updated_at))
            .where(AlertRule.run_id.in_(list(chunk)))
            .group_by(AlertRule.run_id)
        ):
            out[str(run_id)] = (int(n), newest)
    return out


Latest = dict[str, dict[str, tuple[int, float]]]  # quantity -> target -> (step, value)


def latest_values(
    session: Session, run_ids: Sequence[str], quantities: set[str]
) -> dict[str, Latest]:
    """The latest rank-0 (step, value) of every series of ``quantities`` of the runs: one
    index seek per series."""
    out: dict[str, Latest] = {}
    if not run_ids or not quantities:
        return out
    for chunk in chunks(list(run_ids)):
        rows = _latest_rows(session, list(chunk), sorted(quantities))
        for run_id, quantity, target, step, value in rows:
            v = math.nan if value is None else float(value)  # SQLite keeps NaN as NULL
            out.setdefault(run_id, {}).setdefault(quantity, {})[target] = (int(step), v)
    return out


def _latest_rows(session: Session, run_ids: list[str], quantities: list[str]) -> list[Any]:
    runs = ",".join(f":r{i}" for i in range(len(run_ids)))
    qs = ",".join(f":q{i}" for i in range(len(quantities)))
    params = {**{f"r{i}": r for i, r in enumerate(run_ids)},
              **{f"q{i}": q for i, q in enumerate(quantities)}}  # fmt: skip
    return list(
        session.execute(
            text(
                "SELECT s.run_id, s.quantity, s.target, p.step, p.value FROM series s "
                "JOIN points p ON p.series_id = s.id AND p.step = "
                "(SELECT MAX(step) FROM points WHERE series_id = s.id) "
                f"WHERE s.rank = 0 AND s.run_id IN ({runs}) AND s.quantity IN ({qs})"
            ),
            params,
        )
    )


def run_margins(session: Session, run_ids: Sequence[str]) -> dict[str, list[Margin]]:
    """Every run-level rule of each run with its margin (``alerts.margin.rule_margin``), in
    rule order. A stored rule that no longer validates is reported, not raised.

    Rule and state are read as JSON text: the rule's is the parse cache's key, and a state is
    parsed only for a rule whose margin reads statistics (``margin.needs_state``); the others
    take whether they fire from the alerts table (the state is O(targets) JSON: most of the
    cost for a thousand runs)."""
    rows: dict[str, list[tuple[int, str, str, str, str | None]]] = {}
    columns = (AlertRule.run_id, AlertRule.id, AlertRule.name, AlertRule.quantity,
               cast(AlertRule.rule, Text), cast(AlertRule.state, Text))  # fmt: skip
    firing: set[int] = set()
    for chunk in chunks(list(run_ids)):
        for run_id, *row in session.execute(
            select(*columns)
            .where(AlertRule.run_id.in_(list(chunk)))
            .order_by(AlertRule.run_id, AlertRule.id)
        ):
            rows.setdefault(str(run_id), []).append(tuple(row))  # type: ignore[arg-type]
        firing.update(
            session.scalars(
                select(Alert.rule_id).where(
                    Alert.run_id.in_(list(chunk)), Alert.state == AlertState.FIRING.value
                )
            )
        )
    quantities = {q for rs in rows.values() for _, _, q, _, _ in rs}
    latest = latest_values(session, list(rows), quantities)
    out: dict[str, list[Margin]] = {run_id: [] for run_id in run_ids}
    for run_id, rule_rows in rows.items():
        values = latest.get(run_id, {})
        for row_id, name, quantity, raw, raw_state in rule_rows:
            try:
                rule = _parsed(raw)
            except (RuleError, ValueError) as exc:
                out[run_id].append(
                    Margin(rule=name, quantity=quantity, condition="?", severity="",
                           firing=row_id in firing, pending=True,
                           note=f"rule not readable: {exc}")
                )  # fmt: skip
                continue
            latest_q = values.get(rule.quantity, {})
            if needs_state(rule):
                state = json.loads(raw_state) if raw_state else None
                out[run_id].append(rule_margin(rule, state, latest_q))
            else:
                out[run_id].append(rule_margin(rule, None, latest_q, firing=row_id in firing))
    return out


# --- sparklines ----------------------------------------------------------------------------


def sparklines(
    session: Session, run_ids: Sequence[str], *, quantity: str = "loss", points: int = 50
) -> dict[str, tuple[Steps, Values]]:
    """Each run's ``quantity`` (target ``global``, rank 0) downsampled to ~``points`` by the
    one downsampling rule (min and max per bucket: spikes stay): from the rollup's per-block
    min, max and first NaN, or, for a series of fewer than points / 2 blocks, from its
    points. Two statements per chunk of runs, never one per run."""
    conn = session.connection()
    by_series: dict[int, str] = {}
    for chunk in chunks(list(run_ids)):
        for sid, run_id in session.execute(
            select(Series.id, Series.run_id).where(
                Series.run_id.in_(list(chunk)),
                and_(Series.quantity == quantity, Series.target == "global", Series.rank == 0),
            )
        ):
            by_series[int(sid)] = str(run_id)
    out: dict[str, tuple[Steps, Values]] = {}
    short: list[int] = []
    for chunk in chunks(sorted(by_series)):
        rows = fetch_tuples(
            conn,
            "SELECT series_id, min_step, min_value, max_step, max_value, nan_step "
            f"FROM point_blocks WHERE series_id IN ({id_list(chunk)}) ORDER BY series_id, block",
        )
        if not rows:
            continue
        table = np.array(rows, dtype=np.float64)  # (blocks, 6); NULL -> nan
        for sid, a, b in series_slices(table[:, 0].astype(np.int64)):
            if b - a < points // 2:
                short.append(sid)
                continue
            out[by_series[sid]] = _from_blocks(table[a:b], points)
    for chunk in chunks(short):
        rows = fetch_tuples(
            conn,
            "SELECT series_id, step, value FROM points "
            f"WHERE series_id IN ({id_list(chunk)}) ORDER BY series_id, step",
        )
        table = np.array(rows, dtype=np.float64).reshape(-1, 3)
        for sid, a, b in series_slices(table[:, 0].astype(np.int64)):
            steps = table[a:b, 1].astype(np.int64)
            out[by_series[sid]] = downsample(steps, table[a:b, 2], points)
    return out


def _from_blocks(blocks: np.ndarray[Any, Any], points: int) -> tuple[Steps, Values]:
    """Candidate points of a series' rollup rows (each block's min, max and first NaN),
    step-ordered, then the downsampling rule."""
    min_step, min_value = blocks[:, 1], blocks[:, 2]
    max_step, max_value = blocks[:, 3], blocks[:, 4]
    nan_step = blocks[:, 5]
    has_min, has_max, has_nan = ~np.isnan(min_step), ~np.isnan(max_step), ~np.isnan(nan_step)
    steps = np.concatenate([min_step[has_min], max_step[has_max], nan_step[has_nan]])
    values = np.concatenate(
        [min_value[has_min], max_value[has_max], np.full(int(has_nan.sum()), np.nan)]
    )
    order = np.argsort(steps, kind="stable")
    steps_i = steps[order].astype(np.int64)
    values = values[order]
    keep = np.r_[True, steps_i[1:] != steps_i[:-1]]  # a block's min and max may be one point
    return downsample(steps_i[keep], values[keep], points)
