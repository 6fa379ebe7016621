"""POST /api/detections (+ /batch): verify the image, authorize the camera, identify through the ReID deployment."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import FormData

from serve_app.api.deps import PrincipalDep, ReIDDep, ReIDService, ResourcesDep
from serve_app.api.problems import Problem, image_problem, rule_errors
from serve_app.config import Settings
from serve_app.errors import ImageConflict, ImageRejected, ModelUnreachable, NotFound
from serve_app.images import decode_image, read_limited, resolve_image_uri, store_upload, upload_uri
from serve_app.keys import Principal
from serve_app.reid.identification import Identification, IdentifyRequest, recorded_elsewhere
from serve_app.reid.preprocessing import BBox, crop
from serve_app.resources import Resources
from serve_app.store.detections import camera_site as stored_camera_site

logger = logging.getLogger(__name__)

router = APIRouter(tags=["identification"])

MAX_BATCH = 64
IDENTIFY_TIMEOUT_S = 120.0


class BBoxIn(BaseModel):
    """Relative bounding box (0-1), origin top-left."""

    model_config = ConfigDict(extra="forbid")

    x: float = Field(ge=0, le=1)
    y: float = Field(ge=0, le=1)
    w: float = Field(gt=0, le=1)
    h: float = Field(gt=0, le=1)

    def to_bbox(self) -> BBox:
        """The domain bbox (also checks it lies inside the frame)."""
        return BBox(self.x, self.y, self.w, self.h)


class DetectionIn(BaseModel):
    """A detection referring to an image under the image root."""

    model_config = ConfigDict(extra="forbid")

    image_uri: str = Field(min_length=1, max_length=1024)
    camera_id: int = Field(gt=0)
    captured_at: dt.datetime
    bbox: BBoxIn
    confidence: float | None = Field(default=None, ge=0, le=1)

    @field_validator("captured_at")
    @classmethod
    def _aware(cls, value: dt.datetime) -> dt.datetime:
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class BatchIn(BaseModel):
    """Up to 64 detections identified together."""

    model_config = ConfigDict(extra="forbid")

    detections: list[DetectionIn] = Field(min_length=1, max_length=MAX_BATCH)


async def camera_site(resources: Resources, camera_id: int, principal: Principal) -> int:
    """The camera's site, when the key may reach it (404 otherwise)."""
    async with resources.pool.connection() as conn:
        site_id = await stored_camera_site(conn, camera_id=camera_id)
    if site_id is None or not principal.allows(site_id):
        raise NotFound(f"camera {camera_id} not found")
    return site_id


def _prepare(data: bytes, *, bbox: BBox, settings: Settings) -> tuple[Any, int, int]:
    image = decode_image(data, max_pixels=settings.max_image_pixels)
    return crop(image, bbox), image.width, image.height


def _load_uri(path: Path, settings: Settings) -> bytes:
    return read_limited(path, max_bytes=settings.max_image_bytes)


def _reject(exc: ImageRejected | ImageConflict, field: str) -> Problem:
    """The problem for a refused image or an image URI recorded for another camera or time (mapped in problems)."""
    return image_problem(exc, field=field)


async def build_request(
    item: DetectionIn,
    *,
    resources: Resources,
    principal: Principal,
    upload: bytes | None = None,
) -> IdentifyRequest:
    """Authorize, load and verify one detection's image and crop it (in a worker thread)."""
    settings = resources.settings
    try:
        bbox = item.bbox.to_bbox()
    except ValueError as exc:
        raise Problem(
            400, "validation-failed", str(exc), errors=[{"rule": "bbox", "field": "bbox", "detail": str(exc)}]
        ) from exc
    site_id = await camera_site(resources, item.camera_id, principal)
    root = Path(settings.image_root)

    async def check(rel: str) -> None:
        # An image belongs to one camera: a URI recorded for another camera or time is refused here, before
        # anything is read, and again under lock when the detection is stored.
        async with resources.pool.connection() as conn:
            found = await recorded_elsewhere(conn, uri=rel, camera_id=item.camera_id, captured_at=item.captured_at)
        if found:
            raise ImageConflict(rel)

    try:
        if upload is None:
            path, rel = await asyncio.to_thread(resolve_image_uri, item.image_uri, root=root)
            await check(rel)
            data = await asyncio.to_thread(_load_uri, path, settings)
            image_crop, width, height = await asyncio.to_thread(_prepare, data, bbox=bbox, settings=settings)
        else:
            data = upload
            image_crop, width, height = await asyncio.to_thread(_prepare, data, bbox=bbox, settings=settings)
            fmt = "PNG" if data[:4] == b"\x89PNG" else "JPEG"
            rel = upload_uri(data, camera_id=item.camera_id, image_format=fmt)
            await check(rel)
            await asyncio.to_thread(store_upload, data, root=root, image_format=fmt, camera_id=item.camera_id)
    except (ImageRejected, ImageConflict) as exc:
        raise _reject(exc, "image" if upload is not None else "image_uri") from exc
    return IdentifyRequest(
        site_id=site_id,
        camera_id=item.camera_id,
        image_uri=rel,
        captured_at=item.captured_at,
        width=width,
        height=height,
        bbox=bbox,
        crop=image_crop,
        confidence=item.confidence,
    )


async def identify(reid: ReIDService, items: list[IdentifyRequest]) -> list[Identification]:
    """Send each crop to the ReID service (it batches them) and wait for all answers.

    Items naming one image must agree on its camera and capture time (409 otherwise, before anything is
    stored). A refusal from the replica (an image recorded meanwhile for another camera or time) is a 409;
    only a failure to identify is a 503.
    """
    seen: dict[str, tuple[int, dt.datetime]] = {}
    for index, item in enumerate(items):
        if seen.setdefault(item.image_uri, (item.camera_id, item.captured_at)) != (item.camera_id, item.captured_at):
            field = f"detections.{index}.image_uri" if len(items) > 1 else "image_uri"
            raise _reject(ImageConflict(item.image_uri, "the batch names one image with two cameras or times"), field)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(reid.identify(item) for item in items)), timeout=IDENTIFY_TIMEOUT_S
        )
    except ModelUnreachable as exc:
        raise Problem(503, "model-unavailable", exc.detail) from exc
    except ImageConflict as exc:
        raise _reject(exc, "image_uri") from exc
    except Exception as exc:
        logger.warning("identification failed: %r", exc)
        raise Problem(503, "identification-unavailable", f"identification failed: {type(exc).__name__}") from exc
    conflicts = [(i, r) for i, r in enumerate(results) if isinstance(r, ImageConflict)]
    if conflicts:
        # Only in a race the pre-check missed: the batch's other items were stored, so the answer names them
        # (``stored``: index and detection id) and a retry can leave them out instead of storing them twice.
        index, first = conflicts[0]
        problem = _reject(first, f"detections.{index}.image_uri" if len(items) > 1 else "image_uri")
        stored = [
            {"index": i, "detection_id": r.detection_id} for i, r in enumerate(results) if isinstance(r, Identification)
        ]
        problem.extra = {"stored": stored} if stored else {}
        raise problem
    identified = [r for r in results if isinstance(r, Identification)]
    if len(identified) != len(results):
        raise TypeError(f"the ReID service answered {sorted({type(r).__name__ for r in results})}")
    return identified


UPLOAD_FIELDS = ("image", "camera_id", "captured_at", "bbox")


async def _read_upload(request: Request, settings: Settings) -> tuple[DetectionIn, bytes]:
    """The multipart form (its size was capped by the LimitBody middleware), its spooled files closed after."""
    async with request.form(max_files=1, max_fields=10) as form:
        return await _parse_upload(form, settings)


async def _parse_upload(form: FormData, settings: Settings) -> tuple[DetectionIn, bytes]:
    """The detection and image bytes of an upload form; every failure listed at once."""
    errors = [
        {"rule": "unknown_field", "field": name, "detail": f"unknown field {name!r}"}
        for name in sorted(set(form.keys()) - set(UPLOAD_FIELDS))
    ]
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        errors.append(
            {"rule": "missing_field", "field": "image", "detail": "multipart field 'image' (a file) is required"}
        )
    fields: dict[str, Any] = {
        "image_uri": "upload",
        "camera_id": form.get("camera_id"),
        "captured_at": form.get("captured_at"),
    }
    if "bbox" in form:
        try:
            fields["bbox"] = json.loads(str(form["bbox"]))
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
            errors.append({"rule": "malformed_json", "field": "bbox", "detail": str(exc)})
    try:
        item = DetectionIn.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        parsed = rule_errors(exc.errors())
        errors.extend(e for e in parsed if not (e["field"] == "bbox" and any(x["field"] == "bbox" for x in errors)))
    if errors or upload is None or isinstance(upload, str):
        rules = ", ".join(sorted({e["rule"] for e in errors}))
        raise Problem(400, "validation-failed", f"request failed validation: {rules}", errors=errors)
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise Problem(413, "upload-too-large", f"upload exceeds {settings.max_upload_bytes} bytes")
    return item, data


_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "content": {
            # A reference, not DetectionIn.model_json_schema(): its "#/$defs/BBoxIn" would point at the
            # document's root, which has none (ReDoc refuses the schema). BatchIn puts both in components.
            "application/json": {"schema": {"$ref": "#/components/schemas/DetectionIn"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "camera_id", "captured_at", "bbox"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "camera_id": {"type": "integer"},
                        "captured_at": {"type": "string", "format": "date-time"},
                        "bbox": {"type": "string", "description": 'JSON {"x":..,"y":..,"w":..,"h":..} relative 0-1'},
                    },
                }
            },
        },
        "required": True,
    }
}


@router.post("/api/detections", status_code=201, summary="Identify one detection", openapi_extra=_BODY_DOC)
async def post_detection(
    request: Request, resources: ResourcesDep, principal: PrincipalDep, reid: ReIDDep
) -> JSONResponse:
    """JSON with an image_uri under the image root, or multipart with an image file; answers the identification."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        item, data = await _read_upload(request, resources.settings)
        prepared = await build_request(item, resources=resources, principal=principal, upload=data)
    else:
        try:
            item = DetectionIn.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _validation(exc) from exc
        prepared = await build_request(item, resources=resources, principal=principal)
    (result,) = await identify(reid, [prepared])
    return JSONResponse(result.as_json(), status_code=201)


@router.post("/api/detections/batch", status_code=201, summary=f"Identify up to {MAX_BATCH} detections")
async def post_batch(
    body: BatchIn, resources: ResourcesDep, principal: PrincipalDep, reid: ReIDDep
) -> dict[str, list[dict[str, Any]]]:
    """Every item is validated first; one failing item fails the request (no detection is stored)."""
    prepared = []
    for index, item in enumerate(body.detections):
        try:
            prepared.append(await build_request(item, resources=resources, principal=principal))
        except Problem as exc:
            exc.detail = f"detections[{index}]: {exc.detail}"
            if exc.errors:
                exc.errors = [{**e, "field": f"detections.{index}.{e['field']}"} for e in exc.errors]
            raise
        except NotFound as exc:
            raise NotFound(f"detections[{index}]: {exc}") from exc
    results = await identify(reid, prepared)
    return {"items": [r.as_json() for r in results]}


def _validation(exc: ValidationError) -> Problem:
    errors = rule_errors(exc.errors())
    rules = ", ".join(sorted({e["rule"] for e in errors}))
    return Problem(400, "validation-failed", f"request failed validation: {rules}", errors=errors)
