"""Exports: the request form (each failed rule shown beside its field, from the API's problem+json), and the
session's jobs, polled by htmx while any is processing, with download, error line and cancel."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from serve_app.exports.validation import FORMATS, GROUP_BY
from serve_app.web.ui.pages import Page, PageDep, checked_form, field_errors, see_other, sessions

router = APIRouter()

POLL_S = 1


def _site_ids(text: str) -> list[int] | None:
    """``1, 2`` as [1, 2]; blank as None (every site of the key); ValueError for anything else."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        return None
    return [int(p) for p in parts]


async def _jobs(page: Page) -> list[dict[str, Any]]:
    """The session's jobs as the API sees them now; jobs the API no longer knows (expired, deleted) drop out."""
    store = sessions(page.request)
    jobs: list[dict[str, Any]] = []
    for job_id in await store.exports(page.session.id):
        response = await page.api("GET", f"/api/exports/{quote(job_id, safe='')}")
        if response.status_code == 404:
            await store.forget_export(page.session.id, job_id)
            continue
        if response.status_code >= 400:
            page.fail(response)
        jobs.append(response.json())
    return jobs


def _form_defaults() -> dict[str, str]:
    today = dt.datetime.now(dt.UTC).date()
    return {
        "start_date": str(today - dt.timedelta(days=30)),
        "end_date": str(today),
        "group_by": "week",
        "format": "csv",
    }


async def _render(
    page: Page,
    *,
    form: dict[str, str],
    errors: dict[str, list[str]],
    status_code: int = 200,
    created: str | None = None,
) -> HTMLResponse:
    jobs = await _jobs(page)
    return page.render(
        "exports.html",
        {
            "form": form,
            "errors": errors,
            "jobs": jobs,
            "polling": any(j["status"] == "processing" for j in jobs),
            "poll_s": POLL_S,
            "formats": FORMATS,
            "group_bys": GROUP_BY,
            "created": created,
        },
        status_code=status_code,
    )


@router.get("/exports", response_class=HTMLResponse)
async def exports_page(request: Request, page: Page = PageDep) -> HTMLResponse:
    """The form and the session's jobs."""
    return await _render(page, form=_form_defaults(), errors={}, created=request.query_params.get("created"))


@router.post("/exports", response_class=HTMLResponse)
async def request_export(request: Request, page: Page = PageDep) -> Response:
    """Send the form to POST /api/exports; the API's failed rules come back beside their fields."""
    posted = await checked_form(request, page)
    form = {name: str(posted.get(name) or "").strip() for name in (
        "start_date", "end_date", "group_by", "format", "site_ids", "notify_email", "notify_webhook_url"
    )}  # fmt: skip
    body: dict[str, Any] = {k: form[k] for k in ("start_date", "end_date", "group_by", "format")}
    try:
        sites = _site_ids(form["site_ids"])
    except ValueError:
        errors = {"site_ids": ["site_ids: give site ids as whole numbers separated by commas"]}
        return await _render(page, form=form, errors=errors, status_code=400)
    if sites is not None:
        body["site_ids"] = sites
    notify = {k: form[f"notify_{k}"] for k in ("email", "webhook_url") if form[f"notify_{k}"]}
    if notify:
        body["notify"] = notify
    response = await page.api("POST", "/api/exports", body=body)
    if response.status_code in (400, 422):
        return await _render(page, form=form, errors=field_errors(response), status_code=response.status_code)
    if response.status_code >= 400:
        page.fail(response)
    job_id = str(response.json()["id"])
    await sessions(request).remember_export(page.session.id, job_id)
    return see_other("/ui/exports", {"created": job_id})


@router.get("/exports/jobs", response_class=HTMLResponse)
async def jobs_fragment(page: Page = PageDep) -> HTMLResponse:
    """The job list alone (what htmx polls); it stops asking for itself once no job is processing."""
    jobs = await _jobs(page)
    return page.render(
        "exports_jobs.html",
        {"jobs": jobs, "polling": any(j["status"] == "processing" for j in jobs), "poll_s": POLL_S},
    )


@router.post("/exports/{job_id}/cancel")
async def cancel_export(job_id: str, request: Request, page: Page = PageDep) -> Response:
    """DELETE /api/exports/{id}: a running job stops, its status and file go."""
    await checked_form(request, page)
    store = sessions(request)
    response = await page.api("DELETE", f"/api/exports/{quote(job_id, safe='')}")
    # A job of this sign-in that already expired just leaves the list; any other unknown id is the API's 404.
    if response.status_code != 204 and not (
        response.status_code == 404 and job_id in await store.exports(page.session.id)
    ):
        page.fail(response)
    await store.forget_export(page.session.id, job_id)
    if request.headers.get("hx-request"):
        return await jobs_fragment(page)
    return see_other("/ui/exports")


@router.get("/exports/{job_id}/download")
async def download(job_id: str, page: Page = PageDep) -> Response:
    """The file, streamed from the API's download route."""
    return page.relay(f"/api/exports/{quote(job_id, safe='')}/download")
