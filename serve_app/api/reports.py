"""GET /api/reid/threshold-report: the latest threshold analysis visible to the caller's key, and the picture of a
report's histogram.

``python -m batch.analyze`` stores each report with its site scope (NULL = all sites). A key for all
sites gets the newest all-sites report (else the newest of any scope); a key for some sites gets the
newest report whose scope lies wholly inside its sites, so no key sees another site's figures
(serve_app/store/reports.py).
"""

from __future__ import annotations

import asyncio
import io
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response

from serve_app.api.deps import PrincipalDep, ResourcesDep
from serve_app.api.problems import Problem
from serve_app.errors import NotFound
from serve_app.store.reports import latest_report, report_by_id

router = APIRouter(tags=["reid"])

# The colours of python -m batch.analyze's histogram.png: bars, current threshold, recommended threshold.
BAR_COLOR = "#4c72b0"
CURRENT_COLOR = "#d62728"
RECOMMENDED_COLOR = "#2ca02c"
HISTOGRAM_SIZE_IN = (9.0, 4.8)
HISTOGRAM_DPI = 100
CACHE_CONTROL = "private, max-age=86400"
"""A stored report never changes, so its picture may be kept a day."""


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


def histogram_png(report: dict[str, Any], *, model_version: str) -> bytes:
    """The report's top-1 similarity histogram with its current (red) and recommended (green) thresholds, as
    ``python -m batch.analyze`` draws histogram.png; a figure of its own, so concurrent calls share no state."""
    from matplotlib.figure import Figure  # only this route draws: the app does not load matplotlib otherwise

    edges, counts = report["histogram"]["edges"], report["histogram"]["counts"]
    nonzero = [i for i, c in enumerate(counts) if c]
    trusted = "" if report.get("recommendation_trusted", True) else " (not trustworthy)"
    lines = [
        (float(report[name]), color, label)
        for name, color, label in (
            ("current_threshold", CURRENT_COLOR, "current threshold {:.2f}"),
            ("recommended_threshold", RECOMMENDED_COLOR, "recommended {:.3f}" + trusted),
        )
        if isinstance(report.get(name), int | float)
    ]
    lo = edges[nonzero[0]] if nonzero else 0.0
    hi = edges[nonzero[-1] + 1] if nonzero else 1.0
    fig = Figure(figsize=HISTOGRAM_SIZE_IN, dpi=HISTOGRAM_DPI)
    ax = fig.subplots()
    ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color=BAR_COLOR, label="top-1 similarity")
    for value, color, label in lines:
        ax.axvline(value, color=color, linewidth=2.5, label=label.format(value))
    ax.set_xlim(min([lo, *(v for v, _, _ in lines)]) - 0.05, max([hi, *(v for v, _, _ in lines)]) + 0.05)
    ax.set_xlabel("top-1 cosine similarity")
    ax.set_ylabel("detections")
    title = f"{model_version}: {sum(counts)} detections"
    ax.set_title(title + (" - RANDOM WEIGHTS, meaningless" if report.get("random_weights") else ""))
    ax.legend(loc="upper left")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


@router.get(
    "/api/reid/threshold-report/{report_id}/histogram.png",
    summary="A threshold report's histogram as a PNG",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 304: {"description": "Not modified (If-None-Match)"}},
)
async def threshold_report_histogram(
    report_id: Annotated[int, Path(gt=0, le=2**63 - 1)],
    resources: ResourcesDep,
    principal: PrincipalDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The histogram of report ``report_id`` (its ``report_id`` field) with the current and recommended
    thresholds drawn; 404 for a report this key may not see (as for one that does not exist) and
    ``histogram-unavailable`` for a report stored without histogram counts."""
    row = await report_by_id(resources.pool, report_id=report_id, sites=principal.site_filter())
    if row is None:
        raise NotFound(f"threshold report {report_id} not found")
    histogram = row["report"].get("histogram")
    edges, counts = (histogram.get("edges"), histogram.get("counts")) if isinstance(histogram, dict) else (None, None)
    if not isinstance(edges, list) or not isinstance(counts, list) or not counts or len(edges) != len(counts) + 1:
        raise Problem(404, "histogram-unavailable", f"threshold report {report_id} has no histogram")
    tag = f'"threshold-report-{report_id}-histogram"'
    headers = {"ETag": tag, "Cache-Control": CACHE_CONTROL}
    if if_none_match is not None and tag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    data = await asyncio.to_thread(histogram_png, row["report"], model_version=row["model_version"])
    return Response(content=data, media_type="image/png", headers=headers)
