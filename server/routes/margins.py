"""How far each of a run's alert rules is from firing (``alerts.margin``): the run page's
rule table, and a certificate that a run is not at risk when every rule is clear."""

from __future__ import annotations

from fastapi import APIRouter, Response

from rankguard.server.alerts.margin import health, nearest
from rankguard.server.deps import DbDep, ReadPrincipal, run_or_404
from rankguard.server.middleware import WireJSONResponse
from rankguard.server.storage.alerts import firing_counts
from rankguard.server.storage.fleet import run_margins

router = APIRouter(tags=["alerts"])


@router.get("/runs/{run_id}/margins")
def read_run_margins(run_id: str, db: DbDep, principal: ReadPrincipal) -> Response:
    """Each rule of the run with its margin in the rule's own terms (``margin`` < 0: the
    latest value trips it; null: not assessed, ``note`` says why), the rule nearest to
    firing and the run's health (``ok``: every rule with data is assessed and clear)."""
    with db.read() as session:
        run_or_404(session, principal, run_id)
        margins = run_margins(session, [run_id])[run_id]
        firing = sum(firing_counts(session=session, run_ids=[run_id]).values())
    near = nearest(margins)
    return WireJSONResponse(
        {
            "data": [m.to_dict() for m in margins],
            "count": len(margins),
            "nearest": near.to_dict() if near is not None else None,
            "health": health(margins, firing),
        }
    )
