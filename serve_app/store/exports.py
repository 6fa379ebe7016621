"""Queries around export jobs outside the runner's streaming reads (those live in serve_app/exports/summary.py
and camtrap.py, one query per table written)."""

from __future__ import annotations

from collections.abc import Iterable

from serve_app.store.db import AsyncConn, SyncConn

KNOWN_SITES_SQL = "SELECT id FROM sites WHERE id = ANY(%s)"
SNAPSHOT_SQL = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"


async def unknown_site_ids(conn: AsyncConn, *, site_ids: Iterable[int]) -> list[int]:
    """The ids among ``site_ids`` that name no site, sorted."""
    wanted = sorted(set(site_ids))
    cur = await conn.execute(KNOWN_SITES_SQL, (wanted,))
    known = {int(row["id"]) for row in await cur.fetchall()}
    return [site_id for site_id in wanted if site_id not in known]


def begin_snapshot(conn: SyncConn) -> None:
    """Open a read-only transaction on one snapshot: every table of an export agrees with the others."""
    conn.execute(SNAPSHOT_SQL)
