"""Queries the identification routes make before a crop reaches the model (the model's own writes live in
serve_app/reid/identification.py)."""

from __future__ import annotations

from serve_app.store.db import AsyncConn

CAMERA_SITE_SQL = "SELECT site_id FROM cameras WHERE id = %s"


async def camera_site(conn: AsyncConn, *, camera_id: int) -> int | None:
    """The site a camera belongs to; None when there is no such camera."""
    cur = await conn.execute(CAMERA_SITE_SQL, (camera_id,))
    row = await cur.fetchone()
    return None if row is None else int(row["site_id"])
