"""Export API: validate, queue a runner task, report status from Redis, serve and delete files; notify when a job
this process ends (a lapsed lease, a task that could not start) asked for it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.deps import ExportQueueDep, PrincipalDep, ResourcesDep
from serve_app.api.problems import PROBLEM_MEDIA_TYPE, Problem
from serve_app.errors import NotFound, ServiceUnavailable
from serve_app.exports import metrics
from serve_app.exports.files import EXTENSIONS, MEDIA_TYPES, ExportFiles, file_uri
from serve_app.exports.jobs import Job, JobStore, fingerprint
from serve_app.exports.notify import Notifier, NotifyConfig
from serve_app.exports.sweeper import job_lost, run_sweeper
from serve_app.exports.validation import (
    FORMATS,
    GROUP_BY,
    MAX_EMAIL_CHARS,
    MAX_URL_CHARS,
    RuleError,
    only_notify_failed,
    requested_site_ids,
    validate_export_request,
)
from serve_app.keys import Principal
from serve_app.resources import Resources
from serve_app.store.exports import unknown_site_ids

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


@dataclass
class ExportState:
    """Per-replica helpers (job status lives in Redis; the runner is the export queue's)."""

    store: JobStore
    files: ExportFiles
    notifier: Notifier


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the job store on the app's Redis client and run the sweeper while the app runs; deliveries of
    notifications still running at shutdown are stopped (and recorded as interrupted)."""
    resources: Resources = app.state.resources
    settings = resources.settings
    store = JobStore(
        resources.redis, status_ttl_s=settings.export_status_ttl_s, start_grace_s=settings.export_start_grace_s
    )
    notifier = Notifier(resources.redis, NotifyConfig.from_settings(settings))
    state = ExportState(store=store, files=ExportFiles(settings.export_dir), notifier=notifier)
    app.state.exports = state
    sweeper = asyncio.create_task(
        run_sweeper(
            resources.redis,
            store,
            state.files,
            interval_s=settings.export_sweep_interval_s,
            file_ttl_s=settings.export_status_ttl_s,
            notifier=notifier,
        )
    )
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await notifier.aclose()


router = APIRouter(prefix="/api/exports", tags=["exports"], lifespan=lifespan)


class NotifyRequest(BaseModel):
    """Where to announce that the export ended (completed or failed); at least one of the two."""

    model_config = ConfigDict(extra="forbid")

    email: str | None = Field(
        default=None,
        max_length=MAX_EMAIL_CHARS,
        description="An address like name@example.org (VR-006); needs an SMTP host on the server (VR-008).",
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=MAX_URL_CHARS,
        description="An http or https URL with a host (VR-007); receives a signed JSON POST.",
    )


class ExportRequestBody(BaseModel):
    """The body of POST /api/exports (documented here; checked rule by rule in exports.validation)."""

    model_config = ConfigDict(extra="forbid")

    start_date: dt.date = Field(description="First day (UTC) of the export, YYYY-MM-DD; not after today (VR-004).")
    end_date: dt.date = Field(
        description="Last day (UTC), included; after start_date (VR-001), at most 365 days later (VR-002), "
        "not after today (VR-005)."
    )
    group_by: Literal["day", "week", "month"] = Field(description="Summary period (VR-003); ISO weeks start Monday.")
    format: Literal["csv", "parquet", "json", "camtrap-dp"]
    site_ids: list[int] | None = Field(default=None, description="Default: every site of the API key.")
    notify: NotifyRequest | None = Field(
        default=None, description="Notify by e-mail and/or webhook when the export ends; invalid: 422."
    )


class NotificationView(BaseModel):
    """How one notification of a job went."""

    channel: Literal["email", "webhook"]
    target: str = Field(description="The address, or the webhook URL without credentials or query.")
    state: Literal["pending", "sent", "failed"] = Field(
        description="pending until the job ends and while retries remain; then sent or failed."
    )
    attempts: int = Field(description="Tries made so far.")
    error: str | None = Field(description="Why the last try failed (one line); null once sent.")
    updated_at: str


class ExportJobView(BaseModel):
    """A job as GET /api/exports/{id} shows it."""

    id: str
    status: Literal["processing", "completed", "failed"]
    format: str
    progress: float
    created_at: str
    updated_at: str
    finished_at: str | None
    error: str | None
    download_url: str | None
    params: dict[str, Any]
    notifications: list[NotificationView] = Field(description="One per channel asked for; empty when none was.")


_PROBLEM: dict[str, Any] = {"content": {PROBLEM_MEDIA_TYPE: {}}}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` written in place: inside an OpenAPI document a "#/$defs/..."
    reference would point at the document's root, where there are none."""
    defs = schema.pop("$defs", {})

    def expand(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return expand({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {key: expand(value) for key, value in node.items()}
        if isinstance(node, list):
            return [expand(item) for item in node]
        return node

    expanded: dict[str, Any] = expand(schema)
    return expanded


_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inlined(ExportRequestBody.model_json_schema())}},
    }
}


def _state(request: Request) -> ExportState:
    state: ExportState = request.app.state.exports
    return state


def _reject(errors: list[RuleError]) -> Problem:
    rules = sorted({e.rule for e in errors})
    metrics.validation_rejected(e.rule for e in errors)
    if only_notify_failed(errors):
        # The export itself is valid; what it asks to notify cannot be used.
        detail = "notify cannot be used: " + "; ".join(e.detail for e in errors)
        return Problem(422, "notify-invalid", detail, errors=[e.as_dict() for e in errors])
    return Problem(
        400, "validation-failed", f"request failed validation: {', '.join(rules)}", errors=[e.as_dict() for e in errors]
    )


async def _unknown_sites(resources: Resources, site_ids: tuple[int, ...]) -> list[int]:
    try:
        async with resources.pool.connection() as conn:
            return await unknown_site_ids(conn, site_ids=site_ids)
    except (psycopg.Error, TimeoutError) as exc:
        raise ServiceUnavailable("postgres", "cannot check site ids") from exc


async def _owned(request: Request, job_id: str, principal: Principal) -> Job:
    state = _state(request)
    job, lapsed = await state.store.read(job_id)
    if job is not None and lapsed:
        await job_lost(job, state.files, state.notifier)
    if job is None or job.owner != principal.key_id:
        raise NotFound(f"no export {job_id}")
    return job


def _view(job: Job, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if job.status == "processing":
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(job.public(), status_code=status_code, headers=headers)


@router.post(
    "",
    status_code=202,
    summary="Request an export (validated before anything is queued)",
    openapi_extra=_BODY_DOC,
    responses={
        202: {"model": ExportJobView, "description": "queued; poll the Location"},
        400: {"description": "failed rules, all listed in errors[]", **_PROBLEM},
        401: {"description": "missing or invalid API key", **_PROBLEM},
        422: {
            "description": "notify cannot be used (`notify-invalid`, each failure in errors[]), or the "
            "Idempotency-Key was reused with another body",
            **_PROBLEM,
        },
    },
)
async def create_export(
    request: Request, principal: PrincipalDep, resources: ResourcesDep, queue: ExportQueueDep
) -> JSONResponse:
    """Check VR-001..VR-008, the body's shape, its site ids and the Idempotency-Key together; 202 with the
    new job, or 400 listing every failure (422 when only ``notify`` failed)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise _reject([RuleError("malformed_json", "body", "the body is not valid JSON")]) from None
    wanted = requested_site_ids(body)
    unknown = await _unknown_sites(resources, tuple(wanted)) if wanted and principal.all_sites else []
    header = request.headers.get("idempotency-key")
    export, errors = validate_export_request(
        body,
        principal=principal,
        today=dt.datetime.now(dt.UTC).date(),
        unknown_site_ids=unknown,
        idempotency_key=header,
        email_configured=resources.settings.smtp_host is not None,
    )
    if export is None:
        raise _reject(errors)
    idempotency = (header, fingerprint(body)) if header is not None else None
    params = export.params(principal)
    state = _state(request)
    outcome, job = await state.store.create(
        owner=principal.key_id,
        params=params,
        file_uri_for=lambda job_id: file_uri(resources.settings.export_dir, job_id, export.format),
        idempotency=idempotency,
        notify=export.notify,
    )
    if outcome == "conflict":
        raise Problem(422, "idempotency-key-reused", "this Idempotency-Key was already used with a different body")
    if job is None:
        raise NotFound("the export expired before it could be read")
    if outcome == "created":
        try:
            await queue.submit(job.id, params=job.params)
        except Exception as exc:
            await _fail_unstarted(state, job.id)
            if isinstance(exc, ServiceUnavailable):
                raise
            logger.warning("cannot start export %s: %r", job.id, exc)
            raise ServiceUnavailable("export queue", "cannot start the export task") from exc
    return _view(job, 202, {"Location": f"/api/exports/{job.id}"})


async def _fail_unstarted(state: ExportState, job_id: str) -> None:
    """Fail a job whose task could not start, and send the notifications it asked for."""
    if await state.store.fail(job_id, error="could not start the export task"):
        ended, _ = await state.store.read(job_id)
        if ended is not None:
            state.notifier.job_ended(ended)


@router.get(
    "/{job_id}",
    summary="Export status",
    responses={200: {"model": ExportJobView}, 404: {"description": "unknown, expired or deleted", **_PROBLEM}},
)
async def get_export(request: Request, job_id: str, principal: PrincipalDep) -> JSONResponse:
    """The job's fields and how its notifications went; ``Retry-After`` while processing; a lapsed lease reads
    as failed."""
    return _view(await _owned(request, job_id, principal))


@router.get(
    "/{job_id}/download",
    summary="Download a completed export",
    response_class=StreamingResponse,
    responses={
        200: {"content": {m.split(";")[0]: {} for m in MEDIA_TYPES.values()}},
        404: {"description": "unknown, expired or deleted", **_PROBLEM},
        409: {"description": "not completed (yet)", **_PROBLEM},
    },
)
async def download_export(request: Request, job_id: str, principal: PrincipalDep) -> StreamingResponse:
    """Stream the file with its media type and a descriptive filename."""
    job = await _owned(request, job_id, principal)
    if job.status != "completed":
        headers = {"Retry-After": str(RETRY_AFTER_S)} if job.status == "processing" else None
        raise Problem(409, "export-not-ready", f"the export is {job.status}", headers=headers)
    files = _state(request).files
    size = await asyncio.to_thread(files.size_bytes, job.file_uri)
    if size is None:
        raise NotFound(f"the file of export {job_id} is gone")
    fmt = job.fields.get("format", "csv")
    params = job.params
    name = f"trailcam-export-{params.get('start_date')}-{params.get('end_date')}-{job_id[:8]}.{EXTENSIONS[fmt]}"
    return StreamingResponse(
        files.chunks(job.file_uri),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(size)},
    )


@router.delete(
    "/{job_id}",
    status_code=204,
    summary="Cancel and delete an export",
    responses={404: {"description": "unknown, expired or deleted", **_PROBLEM}},
)
async def delete_export(request: Request, job_id: str, principal: PrincipalDep, queue: ExportQueueDep) -> Response:
    """Remove the status and the file; a running task is cancelled (or notices on its next heartbeat)."""
    state = _state(request)
    job = await state.store.delete(job_id, owner=principal.key_id)
    if job is None:
        raise NotFound(f"no export {job_id}")
    await queue.cancel(job_id)
    await asyncio.to_thread(state.files.remove, job.file_uri)
    return Response(status_code=204)


__all__ = ["FORMATS", "GROUP_BY", "router"]
