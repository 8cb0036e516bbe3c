"""Databases for ``benchmarks/dashboard_load.py``, written through ``server.storage`` (and, for
the fleet, the real ingest hook, so every run's rules hold the engine state the margins read):

- ``seed_run``: one run with every quantity of the run page (``targets`` weight matrices ×
  ``steps`` sampled steps), histograms, an alert and an intervention;
- ``seed_fleet``: ``runs`` runs of a few series each, judged by the default rules on ingest:
  most healthy, some collapsing (firing), some with hot attention logits (near), some
  finished or failed, with tags;
- ``clone_run``: copies of a run's series, points and rollups under new runs (values scaled),
  in SQL: the compare benchmark's 4 large runs without ingesting 8M points four times.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
from sqlalchemy import text

from rankguard.server import storage
from rankguard.server.alerts.service import Alerting
from rankguard.server.config import Settings
from rankguard.server.db import Database, make_engine, upgrade_schema
from rankguard.server.models import Run
from rankguard.server.storage import ColumnarPoints
from rankguard.server.vocab import RunStatus
from tests.helpers import synthetic

PER_BLOCK = 4  # attention Q, K, V, O: 250 blocks -> 1,000 weight matrices


def open_db(db_url: str) -> Database:
    settings = Settings(database_url=db_url)
    engine = make_engine(settings)
    upgrade_schema(engine)
    return Database(engine, lock_timeout_s=60)


def series_points(
    quantity: str, target: str, steps: np.ndarray, values: np.ndarray
) -> ColumnarPoints:
    n = steps.size
    return ColumnarPoints(
        quantity=[quantity] * n, target=[target] * n, rank=[0] * n, step=steps.tolist(),
        wall_time=[0.0] * n, value=values.tolist(),
    )  # fmt: skip


def concat(parts: list[ColumnarPoints]) -> ColumnarPoints:
    return ColumnarPoints(
        *[
            list(itertools.chain.from_iterable(getattr(p, f) for p in parts))
            for f in ColumnarPoints.__dataclass_fields__
        ]
    )


def _new_run(db: Database, name: str, tags: list[str] | None = None) -> str:
    with db.write() as session:
        project = storage.ensure_project(session=session, name="default")
        run, _ = storage.register_run(
            session=session, project=project, run_id=None, name=name,
            config={"tags": tags or []}, world_size=1, parameters=[],
        )  # fmt: skip
        return run.id


def seed_run(db_url: str, *, targets: int, steps: int, full: bool = True) -> tuple[str, float, int]:
    """One run for the run page (see the module doc); returns (run id, seconds, points).
    ``full=False``: loss, grad_norm and stable_rank only (what the compare view draws)."""
    db = open_db(db_url)
    rng = np.random.default_rng(0)
    blocks = targets // PER_BLOCK
    names = synthetic.weight_targets(blocks, PER_BLOCK)
    step_arr = np.arange(steps, dtype=np.int64)
    t = np.linspace(0, 1, steps)
    start = time.perf_counter()
    run_id = _new_run(db, f"bench-{targets}x{steps}")
    known: dict[Any, int] = {}
    total = 0

    def insert(parts: list[ColumnarPoints]) -> None:
        nonlocal total
        with db.write() as session:
            n, new = storage.insert_points(
                session=session, run_id=run_id, points=concat(parts), known=known
            )
        known.update(new)
        total += n

    insert(
        [
            series_points("loss", "global", step_arr, 4 * np.exp(-3 * t) + 0.5 + 2.0 * (t > 0.8)),
            series_points("grad_norm", "global", step_arr, 1 + 5.0 * (t > 0.78)),
        ]
    )
    chunk: list[ColumnarPoints] = []
    for i, name in enumerate(names):
        phase = i / len(names)
        sr = (8 + 4 * np.sin(6 * t + 7 * phase)) * (1 - 0.7 * (t > 0.75 + 0.1 * phase)) + 1
        chunk.append(series_points("stable_rank", name, step_arr, sr + 0.1 * rng.random(steps)))
        if full:
            diversity = np.clip(0.9 - 0.6 * t * phase + 0.05 * rng.random(steps), 0, 1)
            chunk.append(series_points("sa_sign_diversity", name, step_arr, diversity))
        if len(chunk) >= 100:
            insert(chunk)
            chunk = []
    for b in range(blocks if full else 0):
        logit = 5 + 20 * t**3 * (1 + b % 7)
        chunk.append(
            series_points("attention_logit_max", f"model.layers.{b}.attn", step_arr, logit)
        )
        if b + 1 < blocks:
            pair = f"model.layers.{b}->model.layers.{b + 1}"
            a = np.clip(0.3 + 0.5 * t + 0.05 * np.sin(11 * t + b), 0, 1)
            chunk.append(series_points("jacobian_alignment", pair, step_arr, a))
            gain = a * (1.2 + 0.8 * np.sin(3 * t + b))
            chunk.append(series_points("jacobian_alignment_gain", pair, step_arr, gain))
        if len(chunk) >= 100:
            insert(chunk)
            chunk = []
    if chunk:
        insert(chunk)

    class _H:  # the attribute shape storage.insert_histograms reads
        def __init__(self, d: dict[str, Any]) -> None:
            self.__dict__.update(d, wall_time=None)

    hists = [
        _H(h)
        for h in synthetic.histograms(blocks=blocks, steps=steps, per_block=PER_BLOCK, count=50)
    ]
    with db.write() as session:
        if full:
            storage.insert_histograms(session=session, run_id=run_id, histograms=hists, known=known)
        for kind, at, event in (("alert", 0.7, synthetic.ALERT_EVENT),
                                ("intervention", 0.8, synthetic.INTERVENTION_EVENT)):  # fmt: skip
            storage.create_event(session=session, run_id=run_id, kind=kind,
                                 step=int(steps * at), payload=event["payload"])  # fmt: skip
    db.dispose()
    return run_id, time.perf_counter() - start, total


def seed_fleet(db_url: str, *, runs: int, steps: int, targets: int = 4) -> float:
    """``runs`` runs judged by the default rules on ingest (see the module doc); seconds."""
    db = open_db(db_url)
    alerting = Alerting(Settings(database_url=db_url))
    names = synthetic.weight_targets(max(1, targets // PER_BLOCK), PER_BLOCK)[:targets]
    step_arr = np.arange(steps, dtype=np.int64)
    t = np.linspace(0, 1, steps)
    rng = np.random.default_rng(1)
    start = time.perf_counter()
    for i in range(runs):
        kind = ("collapsing", "hot", "healthy", "healthy", "healthy")[i % 5]
        tags = ["gpt", f"team-{i % 7}"] + (["hot-lr"] if kind == "hot" else [])
        run_id = _new_run(db, f"fleet-{i:04d}-{kind}", tags)
        loss = 4 * np.exp(-3 * t) + 0.5 + 0.02 * rng.random(steps)
        grad = 1 + 0.05 * rng.random(steps)
        parts = [series_points("loss", "global", step_arr, loss),
                 series_points("grad_norm", "global", step_arr, grad)]  # fmt: skip
        for j, name in enumerate(names):
            drop = 0.08 if kind == "collapsing" else 0.6
            sr = (8 + j + rng.random(steps) * 0.1) * np.where(t > 0.6, drop, 1.0)
            parts.append(series_points("stable_rank", name, step_arr, sr))
        logit = (46.0 if kind == "hot" else 12.0) * (0.5 + 0.5 * t)
        parts.append(series_points("attention_logit_max", "model.layers.0.attn", step_arr, logit))
        batch = concat(parts)
        with db.write() as session:
            storage.insert_points(session=session, run_id=run_id, points=batch, known={})
            run = session.get(Run, run_id)
            assert run is not None
            alerting.on_ingest(session=session, run=run, points=batch)
            if i % 10 == 9:
                end = RunStatus.FAILED if i % 20 == 19 else RunStatus.FINISHED
                storage.finish_run(session=session, run=run, status=end)
    db.dispose()
    return time.perf_counter() - start


def clone_run(db_url: str, source: str, name: str, factor: float) -> str:
    """A new run holding ``source``'s series, points and rollups with values × ``factor``
    (> 0, so each block's extremes stay its extremes), and its events; in SQL."""
    db = open_db(db_url)
    run_id = _new_run(db, name)
    params = {"src": source, "dst": run_id, "f": factor}
    remap = (
        "JOIN series o ON o.id = x.series_id JOIN series n ON n.run_id = :dst "
        "AND n.quantity = o.quantity AND n.target = o.target AND n.rank = o.rank "
        "WHERE o.run_id = :src"
    )
    with db.write() as session:
        for sql in (
            "INSERT INTO series (run_id, quantity, target, rank) "
            "SELECT :dst, quantity, target, rank FROM series WHERE run_id = :src",
            "INSERT INTO points (series_id, step, wall_time, value) "
            f"SELECT n.id, x.step, x.wall_time, x.value * :f FROM points x {remap}",
            "INSERT INTO point_blocks (series_id, block, n, min_step, min_value, max_step, "
            "max_value, nan_step) SELECT n.id, x.block, x.n, x.min_step, x.min_value * :f, "
            f"x.max_step, x.max_value * :f, x.nan_step FROM point_blocks x {remap}",
            "INSERT INTO events (run_id, step, kind, payload, created_at) "
            "SELECT :dst, step, kind, payload, created_at FROM events WHERE run_id = :src",
            "UPDATE runs SET last_step = (SELECT last_step FROM runs WHERE id = :src) "
            "WHERE id = :dst",
        ):
            session.execute(text(sql), params)
    db.dispose()
    return run_id
