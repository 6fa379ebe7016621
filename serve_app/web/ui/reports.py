"""Reports and models: the latest threshold report (of one model version when asked) with its histogram, rate
and precision/recall tables, the recommended threshold beside the one in force, and the model registry with
one version's card; read from ``/api/reid/...`` and ``/api/models``."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, Response

from serve_app.web.ui.pages import Page, PageDep, field_errors

router = APIRouter()

MAX_FIGURE_DEPTH = 2
"""How deep a model card's nested figures are listed (deeper ones are left to the API)."""


def figures(value: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """A card section's scalar figures as (label, text) rows, nested names joined (``at_recommended precision``);
    lists and deeper levels are left out."""
    if isinstance(value, dict):
        if depth > MAX_FIGURE_DEPTH:
            return []
        rows: list[tuple[str, str]] = []
        for key, item in value.items():
            rows += figures(item, f"{prefix} {key}".strip(), depth + 1)
        return rows
    if value is None or isinstance(value, list):
        return []
    if isinstance(value, float):
        return [(prefix.replace("_", " "), f"{value:.4g}")]
    return [(prefix.replace("_", " "), str(value))]


@router.get("/reports", response_class=HTMLResponse)
async def reports_page(request: Request, page: Page = PageDep) -> HTMLResponse:
    """The report of the chosen model version (else the latest), the thresholds in force, the model versions and
    the card of the one in view."""
    version = (request.query_params.get("model_version") or "").strip()
    models = await page.api_json("GET", "/api/models")
    response = await page.api("GET", "/api/reid/threshold-report", params={"model_version": version})
    report: dict[str, Any] | None = None
    errors: dict[str, list[str]] = {}
    if response.status_code in (400, 422):
        errors = field_errors(response)
    elif response.status_code != 404:
        if response.status_code >= 400:
            page.fail(response)
        report = response.json()
    history = await page.api_json("GET", "/api/reid/thresholds/history", params={"limit": 1})
    focus = version or (report["model_version"] if report else "") or next((m["version"] for m in models["items"]), "")
    card: dict[str, Any] | None = None
    if focus and not errors:
        found = await page.api("GET", f"/api/models/{quote(focus, safe='')}")
        if found.status_code == 200:
            card = found.json()
        elif found.status_code not in (400, 404):
            page.fail(found)
    versions = [m["version"] for m in models["items"]]
    if report and report["model_version"] not in versions:
        versions.append(report["model_version"])
    return page.render(
        "reports.html",
        {
            "version": version,
            "versions": versions,
            "report": report,
            "errors": errors,
            "in_force": history["items"][0] if history["items"] else None,
            "models": models["items"],
            "serving": models.get("serving_version"),
            "focus": focus,
            "card": card,
            "card_figures": {
                "Validation": figures(card.get("validation")),
                "Training data": figures((card.get("training") or {}).get("data")),
            }
            if card
            else {},
        },
        status_code=400 if errors else 200,
    )


@router.get("/reports/{report_id}/histogram.png", summary="A threshold report's histogram for the pages")
async def histogram(report_id: Annotated[int, Path(gt=0, le=2**63 - 1)], page: Page = PageDep) -> Response:
    """The API's PNG of the report's histogram, relayed with its ETag (304 when the browser has it)."""
    return page.relay(f"/api/reid/threshold-report/{report_id}/histogram.png")
