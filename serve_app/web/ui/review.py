"""The review queue: one detection at a time beside its candidates; every decision goes through
``POST /api/detections/{id}/assignment`` and lands in review_events with its note."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from serve_app.web.ui.pages import Page, PageDep, PageError, checked_form, field_errors, see_other, whole_number

router = APIRouter()

FILTERS = ("site_id", "camera_id", "since", "until", "min_similarity", "max_similarity", "order")
CANDIDATES = 5


def _filters(source: Any) -> dict[str, str]:
    """The queue's filters from a query or a form, as given (the API checks them)."""
    out: dict[str, str] = {}
    for name in FILTERS:
        value = source.get(name)
        if isinstance(value, str) and value.strip():
            out[name] = value.strip()
    return out


def _day_bound(value: str | None, *, end: bool) -> str | None:
    """A YYYY-MM-DD from the date inputs as the API's bound: from the start of ``since``, to the end of ``until``."""
    if not value:
        return None
    try:
        day = dt.date.fromisoformat(value)
        return f"{day + dt.timedelta(days=1) if end else day}T00:00:00Z"
    except (ValueError, OverflowError):
        return value  # not a date, or the last one there is: the API says why


def _api_params(filters: dict[str, str], *, pos: int) -> dict[str, Any]:
    # The page's default order is the most informative first (the API's is oldest first).
    params: dict[str, Any] = {"order": "informative", **filters, "limit": 1, "offset": pos, "k": CANDIDATES}
    params["since"] = _day_bound(filters.get("since"), end=False)
    params["until"] = _day_bound(filters.get("until"), end=True)
    return params


def _position(raw: str | None) -> int:
    return whole_number(raw, digits=7) or 0


@router.get("/review", response_class=HTMLResponse)
async def review_page(request: Request, page: Page = PageDep) -> Response:
    """The queue's item at ``pos`` under the filters, with the count of what is left."""
    filters = _filters(request.query_params)
    pos = _position(request.query_params.get("pos"))
    response = await page.api("GET", "/api/review", params=_api_params(filters, pos=pos))
    if response.status_code in (400, 422):
        return page.render(
            "review.html",
            {"filters": filters, "errors": field_errors(response), "item": None, "total": None, "pos": 0},
            status_code=422,
        )
    if response.status_code >= 400:
        page.fail(response)
    body = response.json()
    total = int(body["total"])
    if total and pos >= total:  # past the end (the queue shrank): show its last item
        pos = total - 1
        body = await page.api_json("GET", "/api/review", params=_api_params(filters, pos=pos))
    item = body["items"][0] if body["items"] else None
    return page.render(
        "review.html",
        {
            "filters": filters,
            "errors": {},
            "item": item,
            "total": total,
            "pos": pos,
            "last": request.query_params.get("last"),
        },
    )


@router.get("/review/{detection_id}", response_class=HTMLResponse)
async def detection_page(detection_id: int, request: Request, page: Page = PageDep) -> Response:
    """One detection, whatever its decision, with the same decision form and its review history; another site's
    detection is the API's 404."""
    item = await page.api_json("GET", f"/api/detections/{detection_id}", params={"k": CANDIDATES})
    return page.render(
        "review.html",
        {"filters": {}, "errors": {}, "item": item, "total": None, "pos": 0, "single": True,
         "last": request.query_params.get("last")},
    )  # fmt: skip


@router.post("/review/{detection_id}")
async def decide(detection_id: int, request: Request, page: Page = PageDep) -> Response:
    """Accept a candidate, create a new individual, or unassign (not a deer / unidentifiable), with a note."""
    form = await checked_form(request, page)
    action = str(form.get("action") or "")
    note = str(form.get("note") or "").strip() or None
    body: dict[str, Any]
    chosen = whole_number(action[7:]) if action.startswith("accept:") else None
    if chosen:
        body = {"deer_id": chosen}
    elif action == "new":
        name = str(form.get("new_name") or "").strip()
        if not name:
            raise PageError(422, "give the new individual a name (press n, type it, then Enter)")
        body = {"new_deer": {"name": name}}
    elif action == "unassign":
        body = {"unassign": True}
    else:
        raise PageError(422, f"unknown decision {action!r}")
    if note:
        body["note"] = note
    await page.api_json("POST", f"/api/detections/{detection_id}/assignment", body=body)
    if form.get("back") == "detection":
        return see_other(f"/ui/review/{detection_id}", {"last": detection_id})
    # The decided item left the queue: the same position now holds the next one.
    return see_other(
        "/ui/review", {**_filters(form), "pos": _position(str(form.get("pos") or "")), "last": detection_id}
    )
