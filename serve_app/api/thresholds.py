"""GET /api/reid/thresholds/history: the threshold changes ``python -m batch.thresholds apply`` made, newest first.

Thresholds are one setting of the whole app, so any valid key reads the history (it is not scoped to sites).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from serve_app.api.deps import PrincipalDep, ResourcesDep
from serve_app.store.db import Row
from serve_app.store.threshold_history import recent_changes

router = APIRouter(tags=["reid"])

MAX_OFFSET = 1_000_000
"""The deepest page start the history serves (a weekly change adds 52 rows a year)."""


def _change(row: Row, *, all_sites: bool) -> dict[str, Any]:
    """One change; the evidence and report (figures over every site) only for a key that sees every site, as
    GET /api/reid/threshold-report shows all-sites figures only to such keys."""
    return {
        "id": row["id"],
        "at": row["at"].isoformat(),
        "actor": row["actor"],
        "model_version": row["model_version"],
        "from": {"accept_threshold": row["from_accept"], "review_threshold": row["from_review"]},
        "to": {"accept_threshold": row["to_accept"], "review_threshold": row["to_review"]},
        "report_id": row["report_id"] if all_sites else None,
        "evidence": row["evidence"] if all_sites else None,
    }


@router.get("/api/reid/thresholds/history", summary="Threshold changes applied to the running app, newest first")
async def threshold_history(
    resources: ResourcesDep,
    principal: PrincipalDep,
    limit: int = Query(default=50, ge=1, le=500, description="changes per page"),
    offset: int = Query(default=0, ge=0, le=MAX_OFFSET, description="changes to skip (the next page: offset + limit)"),
) -> dict[str, list[dict[str, Any]]]:
    """Each change: when, who or what made it, the model version, the thresholds before and after (review null:
    no review band), the threshold report it rests on and the evidence the guard checked (both null for a key
    limited to some sites: they are figures over every site)."""
    rows = await recent_changes(resources.pool, limit=limit, offset=offset)
    all_sites = principal.site_filter() is None
    return {"items": [_change(r, all_sites=all_sites) for r in rows]}
