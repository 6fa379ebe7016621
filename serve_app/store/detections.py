"""Queries the identification routes make before a crop reaches the model (the model's own writes live in
serve_app/reid/identification.py)."""

from __future__ import annotations

from typing import Any

from serve_app.store.db import AsyncConn

CAMERA_SITE_SQL = "SELECT site_id FROM cameras WHERE id = %s"


async def camera_site(conn: AsyncConn, *, camera_id: int) -> int | None:
    """The site a camera belongs to; None when there is no such camera."""
    cur = await conn.execute(CAMERA_SITE_SQL, (camera_id,))
    row = await cur.fetchone()
    return None if row is None else int(row["site_id"])


CROP_SOURCE_SQL = """
SELECT d.id, c.site_id, i.uri, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h
FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id
WHERE d.id = %(id)s AND (%(sites)s::bigint[] IS NULL OR c.site_id = ANY(%(sites)s::bigint[]))
"""


async def crop_source(conn: AsyncConn, *, detection_id: int, sites: list[int] | None) -> dict[str, Any] | None:
    """A detection's image URI and box when ``sites`` (None: every site) hold it; None otherwise."""
    cur = await conn.execute(CROP_SOURCE_SQL, {"id": detection_id, "sites": sites})
    row = await cur.fetchone()
    return None if row is None else dict(row)
