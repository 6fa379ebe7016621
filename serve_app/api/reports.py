"""GET /api/reid/threshold-report: the latest threshold analysis visible to the caller's key.

``python -m batch.analyze`` stores each report with its site scope (NULL = all sites). A key for all
sites gets the newest all-sites report (else the newest of any scope); a key for some sites gets the
newest report whose scope lies wholly inside its sites, so no key sees another site's figures
(serve_app/store/reports.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from serve_app.api.deps import PrincipalDep, ResourcesDep
from serve_app.errors import NotFound
from serve_app.store.reports import latest_report

router = APIRouter(tags=["reid"])


@router.get("/api/reid/threshold-report", summary="Latest threshold analysis report for the key's sites")
async def threshold_report(
    resources: ResourcesDep,
    principal: PrincipalDep,
    model_version: Annotated[str | None, Query(max_length=200, description="only reports of this model")] = None,
) -> dict[str, Any]:
    """The stored report JSON plus its id, scope and creation time; 404 when none is visible."""
    row = await latest_report(resources.pool, model_version=model_version, sites=principal.site_filter())
    if row is None:
        suffix = f" and model {model_version}" if model_version else ""
        raise NotFound(f"no threshold report for this key's sites{suffix}")
    report: dict[str, Any] = dict(row["report"])
    report.update(
        report_id=row["id"], model_version=row["model_version"], site_ids=row["site_ids"],
        created_at=row["created_at"].isoformat(),
    )  # fmt: skip
    return report
