"""RFC 9457 problem details: the one shape every error response of the API takes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serve_app.errors import (
    CorruptImage,
    DeerMerged,
    DeerNotInSite,
    ImageConflict,
    ImageNotFound,
    ImageRejected,
    ImageTooLarge,
    ImageTooManyPixels,
    ImageUnreadable,
    ImageUriRefused,
    InvalidKey,
    MergeAcrossSites,
    NotFound,
    ProfileRefused,
    ServiceUnavailable,
    UndecodableImage,
    UnsupportedImageType,
)

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"
PROBLEM_BASE = "https://trailcam-reid.dev/problems/"
UNAVAILABLE_RETRY_AFTER_S = 5
"""How long a 503 asks the client to wait before retrying, seconds (its Retry-After header)."""

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# Connection-level failures of a backing service: the caller may retry, so 503 rather than 500.
# (psycopg_pool.PoolTimeout and a connection terminated by a restart are OperationalErrors.)
_UNAVAILABLE: dict[type[Exception], str] = {
    redis.exceptions.ConnectionError: "redis",
    redis.exceptions.TimeoutError: "redis",
    psycopg.OperationalError: "postgres",
}

# pydantic error types -> the stable rule code clients branch on.
_PYDANTIC_RULES = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "literal_error": "invalid_value",
    "enum": "invalid_value",
    "json_invalid": "malformed_json",
}


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["rule", "field", "detail"],
                "properties": {"rule": {"type": "string"}, "field": {"type": "string"}, "detail": {"type": "string"}},
            },
        },
        "services": {"type": "array", "items": {"type": "string"}},
    },
}


def retry_later() -> dict[str, str]:
    """The headers of a 503: come back after :data:`UNAVAILABLE_RETRY_AFTER_S`."""
    return {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}


def problem_doc(description: str) -> dict[str, Any]:
    """An OpenAPI response entry whose body is problem+json."""
    return {"description": description, "content": {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}}}


# The errors any route may answer, documented once for the whole app (routes add their own codes).
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_doc("the request failed validation; every failure is listed in errors[]"),
    401: problem_doc("missing, unknown or revoked API key"),
    404: problem_doc("not found, or not visible to this key"),
    409: problem_doc("the resource's state does not allow this change"),
    413: problem_doc("the body is too large"),
    # Also replaces FastAPI's default 422 (HTTPValidationError), which this app never sends: see 400.
    422: problem_doc("well-formed, but refers to something that cannot be used (e.g. an image that is not there)"),
    503: problem_doc("a backing service (Redis, Postgres, the model) does not answer; retry later"),
}


class Problem(Exception):
    """An HTTP error answered as problem+json; raised by routers, rendered by the handler."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(status, code, detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or _TITLES.get(status, "Error")
        self.errors = list(errors) if errors else None
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


# Domain errors -> (status, problem code) clients branch on. Only this module knows HTTP.
_IMAGE_REJECTIONS: dict[type[ImageRejected], tuple[int, str]] = {
    ImageNotFound: (422, "image-not-found"),
    ImageUnreadable: (422, "image-unreadable"),
    ImageTooLarge: (413, "image-too-large"),
    ImageTooManyPixels: (413, "decompression-bomb"),
    UnsupportedImageType: (415, "unsupported-image-type"),
    UndecodableImage: (422, "invalid-image"),
    CorruptImage: (422, "corrupt-image"),
}
# ImageUriRefused.reason (a PathRefused rule) -> problem code; every refused URI is a 400.
_URI_REFUSALS = {
    "empty": "invalid-image-uri",
    "nul": "invalid-image-uri",
    "unresolvable": "invalid-image-uri",
    "scheme": "image-uri-scheme",
    "absolute": "image-uri-outside-root",
    "parent": "image-uri-outside-root",
    "outside": "image-uri-outside-root",
    "too-long": "image-uri-too-long",
}

# A deer profile that cannot take a change -> (status, problem code).
_PROFILE_REFUSALS: dict[type[ProfileRefused], tuple[int, str]] = {
    DeerMerged: (409, "deer-merged"),
    DeerNotInSite: (422, "deer-not-in-site"),
    MergeAcrossSites: (422, "merge-across-sites"),
}


def profile_status(exc: ProfileRefused) -> tuple[int, str]:
    """The HTTP status and problem code of a change a deer profile refused."""
    return next((found for kind, found in _PROFILE_REFUSALS.items() if isinstance(exc, kind)), (409, "deer-refused"))


def image_status(exc: ImageRejected | ImageConflict) -> tuple[int, str]:
    """The HTTP status and problem code of a refused image or an image URI recorded elsewhere."""
    if isinstance(exc, ImageConflict):
        return 409, "image-conflict"
    if isinstance(exc, ImageUriRefused):
        return 400, _URI_REFUSALS.get(exc.reason, "invalid-image-uri")
    return next((found for kind, found in _IMAGE_REJECTIONS.items() if isinstance(exc, kind)), (422, "invalid-image"))


def image_problem(exc: ImageRejected | ImageConflict, *, field: str) -> Problem:
    """The problem for a refused image (4xx) or an image URI recorded for another camera or time (409)."""
    status, code = image_status(exc)
    return Problem(status, code, exc.detail, errors=[{"rule": code, "field": field, "detail": exc.detail}])


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
    instance: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """A problem+json response with a stable ``type`` per code."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + code,
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = list(errors)
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=dict(headers or {}))


def field_name(loc: Sequence[Any]) -> str:
    """A dotted field path from a pydantic location, without the 'body'/'query' prefix."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "body"


def rule_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """pydantic/FastAPI error dicts as ``[{rule, field, detail}]``: one rule name per mistake on every route."""
    out = []
    for err in errors:
        ctx = err.get("ctx") or {}
        rule = str(ctx.get("rule") or _PYDANTIC_RULES.get(err["type"], "format"))
        message = str(err.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        field = "body" if rule == "malformed_json" else field_name(err.get("loc", ()))
        out.append({"rule": rule, "field": field, "detail": message})
    return out


def validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    """Request validation failures as ``[{rule, field, detail}]``."""
    return rule_errors(exc.errors())


def install_problem_handlers(app: FastAPI) -> None:
    """Map framework and domain errors to problem+json; nothing escapes as a bare 500."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status,
            exc.code,
            exc.detail,
            title=exc.title,
            errors=exc.errors,
            headers=exc.headers,
            instance=request.url.path,
            extra=exc.extra,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        rules = ", ".join(sorted({e["rule"] for e in errors}))
        return problem_response(
            400, "validation-failed", f"request failed validation: {rules}", errors=errors, instance=request.url.path
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_PARSE_ERROR:
            # FastAPI's answer when a model body cannot be decoded at all (e.g. nested past the parser's depth).
            detail = "the body is not valid JSON"
            errors = [{"rule": "malformed_json", "field": "body", "detail": detail}]
            return problem_response(
                400,
                "validation-failed",
                f"request failed validation: {detail}",
                errors=errors,
                instance=request.url.path,
            )
        code = {404: "not-found", 405: "method-not-allowed", 401: "unauthorized"}.get(exc.status_code, "http-error")
        return problem_response(
            exc.status_code,
            code,
            str(exc.detail),
            headers=getattr(exc, "headers", None),
            instance=request.url.path,
        )

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return problem_response(404, "not-found", str(exc) or "not found", instance=request.url.path)

    @app.exception_handler(ImageConflict)
    async def _image_conflict(request: Request, exc: ImageConflict) -> JSONResponse:
        return await _problem(request, image_problem(exc, field="image_uri"))

    @app.exception_handler(ImageRejected)
    async def _image_rejected(request: Request, exc: ImageRejected) -> JSONResponse:
        field = "image_uri" if isinstance(exc, ImageUriRefused) else "image"
        return await _problem(request, image_problem(exc, field=field))

    @app.exception_handler(ProfileRefused)
    async def _profile_refused(request: Request, exc: ProfileRefused) -> JSONResponse:
        status, code = profile_status(exc)
        return problem_response(status, code, exc.detail, instance=request.url.path)

    @app.exception_handler(InvalidKey)
    async def _invalid_key(request: Request, exc: InvalidKey) -> JSONResponse:
        return problem_response(
            401,
            "unauthorized",
            str(exc) or "a valid API key is required",
            headers={"WWW-Authenticate": "Bearer"},
            instance=request.url.path,
        )

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return problem_response(
            503,
            "service-unavailable",
            str(exc),
            headers=retry_later(),
            instance=request.url.path,
            extra={"services": [exc.service]},
        )

    async def _service_down(request: Request, exc: Exception) -> JSONResponse:
        service = next(name for kind, name in _UNAVAILABLE.items() if isinstance(exc, kind))
        logger.warning("%s unavailable on %s %s: %s", service, request.method, request.url.path, type(exc).__name__)
        return problem_response(
            503,
            "service-unavailable",
            f"{service} unavailable; retry later",
            headers=retry_later(),
            instance=request.url.path,
            extra={"services": [service]},
        )

    for kind in _UNAVAILABLE:
        app.add_exception_handler(kind, _service_down)

    @app.exception_handler(psycopg.DataError)
    async def _out_of_range(request: Request, exc: psycopg.DataError) -> JSONResponse:
        # A value the schema let through but Postgres cannot hold (an id or offset beyond bigint).
        logger.info("rejected out-of-range value on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        errors = [{"rule": "out_of_range", "field": "request", "detail": "a value is out of the supported range"}]
        return problem_response(
            400,
            "validation-failed",
            "request failed validation: out_of_range",
            errors=errors,
            instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ClientDisconnect):
            # The client went away mid-body (a closed connection): nobody reads an answer, nothing failed.
            logger.info("client disconnected during %s %s", request.method, request.url.path)
            return problem_response(400, "client-disconnected", "the client closed the connection")
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal-error", "an unexpected error occurred", instance=request.url.path)
