"""threshold_reports: ``python -m batch.analyze`` stores each report with its site scope (NULL = all sites);
``GET /api/reid/threshold-report`` reads the latest one a key may see, its histogram route one by id."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, TypedDict, cast

import psycopg

from serve_app.errors import ServiceUnavailable
from serve_app.store.db import Pool, SyncConn

# A key for all sites gets the newest all-sites report (else the newest of any scope); a key for some sites
# gets the newest report whose scope lies wholly inside its sites, so no key sees another site's figures.
LATEST_SQL = """
SELECT id, model_version, site_ids, report, created_at FROM threshold_reports
WHERE (%(mv)s::text IS NULL OR model_version = %(mv)s)
  AND (%(sites)s::bigint[] IS NULL OR (site_ids IS NOT NULL AND site_ids <@ %(sites)s::bigint[]))
ORDER BY (site_ids IS NULL) DESC, created_at DESC, id DESC
LIMIT 1
"""
# One report by id, under the same rule: a key for some sites sees only reports whose scope lies inside them.
BY_ID_SQL = """
SELECT id, model_version, site_ids, report, created_at FROM threshold_reports
WHERE id = %(id)s AND (%(sites)s::bigint[] IS NULL OR (site_ids IS NOT NULL AND site_ids <@ %(sites)s::bigint[]))
"""
INSERT_SQL = "INSERT INTO threshold_reports (model_version, site_ids, report) VALUES (%s, %s, %s) RETURNING id"


class StoredReport(TypedDict):
    """A stored report with its id, model, scope (None: all sites) and creation time."""

    id: int
    model_version: str
    site_ids: list[int] | None
    report: dict[str, Any]
    created_at: datetime


async def latest_report(pool: Pool, *, model_version: str | None, sites: list[int] | None) -> StoredReport | None:
    """The newest report visible to ``sites`` (None: every site), of ``model_version`` when given; None when there
    is none. ServiceUnavailable when Postgres cannot answer."""
    try:
        async with pool.connection() as conn:
            cur = await conn.execute(LATEST_SQL, {"mv": model_version, "sites": sites})
            row = await cur.fetchone()
    except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
        raise ServiceUnavailable("postgres", "cannot read threshold reports") from exc
    return cast(StoredReport | None, row)


async def report_by_id(pool: Pool, *, report_id: int, sites: list[int] | None) -> StoredReport | None:
    """Report ``report_id`` when ``sites`` (None: every site) may see it; None otherwise. ServiceUnavailable when
    Postgres cannot answer."""
    try:
        async with pool.connection() as conn:
            row = await (await conn.execute(BY_ID_SQL, {"id": report_id, "sites": sites})).fetchone()
    except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
        raise ServiceUnavailable("postgres", "cannot read threshold reports") from exc
    return cast(StoredReport | None, row)


def store_report(conn: SyncConn, *, model_version: str, sites: list[int] | None, report: dict[str, Any]) -> int:
    """Insert a report on the caller's connection (the caller commits); returns its id."""
    row = conn.execute(INSERT_SQL, (model_version, sites, json.dumps(report))).fetchone()
    assert row is not None  # INSERT ... RETURNING returns its row
    return int(row["id"])
