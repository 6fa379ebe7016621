"""GET /api/detections/{id}/crop: a JPEG of a detection's box (with the model's margin), for review screens.

Site-checked like every detection route (another site's detection is a 404), cut at a bounded size, and
cached by the browser with an ETag: a detection's image and box never change, so the tag is a hash of
them and the size asked for.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response

from serve_app.api.deps import PrincipalDep, ResourcesDep
from serve_app.api.problems import Problem
from serve_app.config import Settings
from serve_app.errors import ImageRejected, NotFound
from serve_app.images import decode_image, read_limited, resolve_image_uri
from serve_app.reid.preprocessing import BBox, crop
from serve_app.store.detections import crop_source

router = APIRouter(tags=["reid"])

DEFAULT_SIZE_PX = 384
MAX_SIZE_PX = 1024
JPEG_QUALITY = 85
CACHE_CONTROL = "private, max-age=86400"


def render_crop(uri: str, bbox: BBox, *, size_px: int, settings: Settings) -> bytes:
    """The box of ``uri`` (plus margin) as a JPEG whose longer side is at most ``size_px``."""
    path, _ = resolve_image_uri(uri, root=settings.image_root)
    image = decode_image(read_limited(path, max_bytes=settings.max_image_bytes), max_pixels=settings.max_image_pixels)
    cut = crop(image, bbox, max_side_px=None)
    cut.thumbnail((size_px, size_px))
    out = io.BytesIO()
    cut.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


@router.get(
    "/api/detections/{detection_id}/crop",
    summary="A JPEG of the detection's box",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 304: {"description": "Not modified (If-None-Match)"}},
)
async def detection_crop(
    detection_id: Annotated[int, Path(gt=0, le=2**63 - 1)],
    resources: ResourcesDep,
    principal: PrincipalDep,
    size: int = Query(default=DEFAULT_SIZE_PX, ge=32, le=MAX_SIZE_PX, description="longest side, pixels"),
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The crop with the model's margin, longest side at most ``size``; 404 for a detection of another site (as
    for one that does not exist) and for one whose image file is gone or unreadable (``image-unavailable``)."""
    async with resources.pool.connection() as conn:
        row = await crop_source(conn, detection_id=detection_id, sites=principal.site_filter())
    if row is None:
        raise NotFound(f"detection {detection_id} not found")
    box = (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"])
    tag = '"' + hashlib.sha256(f"{row['uri']}|{box}|{size}".encode()).hexdigest()[:32] + '"'
    headers = {"ETag": tag, "Cache-Control": CACHE_CONTROL}
    if if_none_match is not None and tag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    try:
        data = await asyncio.to_thread(
            render_crop, row["uri"], BBox(*map(float, box)), size_px=size, settings=resources.settings
        )
    except ImageRejected as exc:  # the stored file is gone, unreadable or no longer a valid image
        raise Problem(
            404, "image-unavailable", f"detection {detection_id}'s image cannot be shown: {exc.detail}"
        ) from exc
    return Response(content=data, media_type="image/jpeg", headers=headers)
