"""Deer profiles: the grid of individuals, one profile (gallery, sightings per week, edit form) and merging two
profiles after a side-by-side confirmation; every read and change goes through ``/api/deer``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, Response

from serve_app.web.ui.pages import Page, PageDep, PageError, checked_form, field_errors, see_other, whole_number

router = APIRouter()

DeerId = Annotated[int, Path(gt=0, le=2**63 - 1)]
PAGE_SIZE = 48
"""Profiles per page of the grid."""
GALLERY_SIGHTINGS = 12
"""Newest sightings a profile page pictures."""
MERGE_PICTURES = 4
"""Sightings pictured for each side of a merge confirmation."""
MERGE_CHOICES = 1000
"""Most profiles of a site the merge form offers (the API's largest page)."""
CHART_WEEKS = 26
"""Weeks the sightings chart spans at most (ending with the latest week with a sighting)."""
CHART_W, CHART_H, CHART_TOP, CHART_BOTTOM = 520, 140, 16, 22
"""The chart's drawing size and its margins for the labels, in SVG units."""
SEXES = ("unknown", "female", "male")
FIELDS = ("name", "sex", "notes")


@dataclass(frozen=True)
class Bar:
    """One week of the chart: where its bar stands and what it says."""

    week_start: dt.date
    sightings: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Chart:
    """Sightings per week as bars in an SVG, with the figures its text summary states."""

    bars: list[Bar]
    peak: Bar | None
    total: int
    width: int = CHART_W
    height: int = CHART_H
    top: int = CHART_TOP
    baseline: int = CHART_H - CHART_BOTTOM


def weekly_chart(weeks: list[dict[str, Any]]) -> Chart | None:
    """Bars for the last :data:`CHART_WEEKS` weeks up to the latest week with a sighting (weeks without any drawn
    as empty); None when the profile has no sighting."""
    counts = {dt.date.fromisoformat(str(w["week_start"])): int(w["sightings"]) for w in weeks}
    if not counts:
        return None
    end = max(counts)
    start = max(min(counts), end - dt.timedelta(weeks=CHART_WEEKS - 1))
    days = [start + dt.timedelta(weeks=i) for i in range((end - start).days // 7 + 1)]
    most = max(counts.get(d, 0) for d in days) or 1
    slot = CHART_W / len(days)
    plot_h = CHART_H - CHART_TOP - CHART_BOTTOM
    bars = []
    for i, day in enumerate(days):
        n = counts.get(day, 0)
        height = round(plot_h * n / most, 1)
        bars.append(Bar(day, n, round(i * slot + slot * 0.1, 1), CHART_H - CHART_BOTTOM - height, round(slot * 0.8, 1),
                        height))  # fmt: skip
    peak = max(bars, key=lambda b: (b.sightings, b.week_start))
    return Chart(bars=bars, peak=peak if peak.sightings else None, total=sum(b.sightings for b in bars))


def _offset(raw: str | None) -> int:
    return whole_number(raw, digits=9) or 0


@router.get("/deer", response_class=HTMLResponse)
async def deer_list(request: Request, page: Page = PageDep) -> Response:
    """The key's active profiles, a page at a time, each with its best picture, sightings and last sighting."""
    site = (request.query_params.get("site_id") or "").strip()
    offset = _offset(request.query_params.get("offset"))
    context: dict[str, Any] = {"site": site, "offset": offset, "page_size": PAGE_SIZE, "items": [], "more": False}
    response = await page.api("GET", "/api/deer", params={"site_id": site, "limit": PAGE_SIZE + 1, "offset": offset})
    if response.status_code in (400, 422):
        return page.render("deer_list.html", {**context, "errors": field_errors(response)}, status_code=400)
    if response.status_code >= 400:
        page.fail(response)
    items = response.json()["items"]
    return page.render(
        "deer_list.html", {**context, "errors": {}, "items": items[:PAGE_SIZE], "more": len(items) > PAGE_SIZE}
    )


async def _profile(page: Page, deer_id: int, *, sightings: int = GALLERY_SIGHTINGS) -> dict[str, Any]:
    """The profile as the API answers it, with its ``sightings`` latest pictures."""
    profile: dict[str, Any] = await page.api_json("GET", f"/api/deer/{deer_id}", params={"sightings": sightings})
    return profile


async def _render_profile(
    page: Page,
    deer_id: int,
    *,
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    profile = await _profile(page, deer_id)
    others: list[dict[str, Any]] = []
    if profile["merged_into"] is None:
        listed = await page.api_json("GET", "/api/deer", params={"site_id": profile["site_id"], "limit": MERGE_CHOICES})
        others = [d for d in listed["items"] if d["id"] != deer_id]
    query = page.request.query_params
    return page.render(
        "deer.html",
        {
            "deer": profile,
            "chart": weekly_chart(profile["sightings_per_week"]),
            "others": others,
            "form": form or {"name": profile["name"], "sex": profile["sex"] or "", "notes": profile["notes"] or ""},
            "errors": errors or {},
            "other_errors": [m for f, ms in (errors or {}).items() if f not in FIELDS for m in ms],
            "sexes": SEXES,
            "saved": query.get("saved") == "1",
            "merged": whole_number(query.get("merged")),
            "moved": whole_number(query.get("moved")),
        },
        status_code=status_code,
    )


@router.get("/deer/{deer_id}", response_class=HTMLResponse)
async def deer_page(deer_id: DeerId, page: Page = PageDep) -> HTMLResponse:
    """One profile: its figures, sightings per week, newest sightings, the edit form and the merge form."""
    return await _render_profile(page, deer_id)


@router.post("/deer/{deer_id}", response_class=HTMLResponse)
async def edit_deer(deer_id: DeerId, request: Request, page: Page = PageDep) -> Response:
    """PATCH the name, sex and notes; a refused field is shown beside it with the form as it was sent."""
    posted = await checked_form(request, page)
    form = {name: str(posted.get(name) or "") for name in FIELDS}
    body = {"name": form["name"].strip(), "sex": form["sex"] or None, "notes": form["notes"].strip() or None}
    response = await page.api("PATCH", f"/api/deer/{deer_id}", body=body)
    if response.status_code in (400, 422):
        errors = field_errors(response)
        if response.json().get("code") == "name-required":
            errors = {"name": errors.pop("", [])} | errors
        return await _render_profile(page, deer_id, form=form, errors=errors, status_code=response.status_code)
    if response.status_code >= 400:
        page.fail(response)
    return see_other(f"/ui/deer/{deer_id}", {"saved": 1})


def _into(raw: object) -> int:
    """The chosen profile id of a merge form or link."""
    chosen = whole_number(raw.strip() if isinstance(raw, str) else None)
    if not chosen:
        raise PageError(400, "choose the profile to merge into")
    return chosen


@router.get("/deer/{deer_id}/merge", response_class=HTMLResponse)
async def merge_confirmation(deer_id: DeerId, request: Request, page: Page = PageDep) -> HTMLResponse:
    """Both profiles side by side before a merge: what goes, what stays."""
    into = _into(request.query_params.get("into"))
    if into == deer_id:
        raise PageError(422, "a profile cannot be merged into itself: choose another one")
    source = await _profile(page, deer_id, sightings=MERGE_PICTURES)
    target = await _profile(page, into, sightings=MERGE_PICTURES)
    if source["site_id"] != target["site_id"]:
        raise PageError(422, "profiles of different sites cannot be merged")
    for side in (source, target):
        if side["merged_into"] is not None:
            raise PageError(409, f"{side['name']} (#{side['id']}) was already merged into #{side['merged_into']}")
    return page.render("deer_merge.html", {"source": source, "target": target})


@router.post("/deer/{deer_id}/merge")
async def merge(deer_id: DeerId, request: Request, page: Page = PageDep) -> Response:
    """POST /api/deer/{id}/merge; then the surviving profile with a notice of what moved."""
    form = await checked_form(request, page)
    into = _into(form.get("into"))
    note = str(form.get("note") or "").strip() or None
    done = await page.api_json("POST", f"/api/deer/{deer_id}/merge", body={"into": into, "note": note})
    return see_other(f"/ui/deer/{into}", {"merged": deer_id, "moved": done["detections_moved"]})
