"""threshold_changes: every threshold change ``python -m batch.thresholds apply`` made to the running app, and the
threshold reports such a change may rest on.

``GET /api/reid/thresholds/history`` and ``python -m batch.thresholds history`` read the changes newest first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

import psycopg
from psycopg.types.json import Jsonb

from serve_app.errors import ServiceUnavailable
from serve_app.store.db import Pool, Row, SyncConn
from serve_app.store.reports import StoredReport

INSERT_SQL = """
INSERT INTO threshold_changes (actor, model_version, from_accept, from_review, to_accept, to_review, report_id,
                               evidence)
VALUES (%(actor)s, %(model_version)s, %(from_accept)s, %(from_review)s, %(to_accept)s, %(to_review)s,
        %(report_id)s, %(evidence)s)
RETURNING id
"""
HISTORY_SQL = """
SELECT id, at, actor, model_version, from_accept, from_review, to_accept, to_review, report_id, evidence
FROM threshold_changes ORDER BY at DESC, id DESC LIMIT %(limit)s OFFSET %(offset)s
"""
REPORT_SQL = "SELECT id, model_version, site_ids, report, created_at FROM threshold_reports WHERE id = %s"
# Thresholds apply to every site, so only a report over all sites (site_ids NULL) may set them.
LATEST_ALL_SITES_SQL = """
SELECT id, model_version, site_ids, report, created_at FROM threshold_reports
WHERE model_version = %s AND site_ids IS NULL ORDER BY created_at DESC, id DESC LIMIT 1
"""


@dataclass(frozen=True)
class ThresholdChange:
    """One applied change: who, for which model, from and to which thresholds (review None: no band), on which
    report and evidence."""

    actor: str
    model_version: str
    from_accept: float
    from_review: float | None
    to_accept: float
    to_review: float | None
    report_id: int
    evidence: dict[str, Any]


def record_change(conn: SyncConn, change: ThresholdChange) -> int:
    """Insert one change and commit; returns its id."""
    values = {**asdict(change), "evidence": Jsonb(change.evidence)}
    row = conn.execute(INSERT_SQL, values).fetchone()
    assert row is not None  # INSERT ... RETURNING returns its row
    conn.commit()
    return int(row["id"])


def changes(conn: SyncConn, *, limit: int, offset: int = 0) -> list[Row]:
    """Recorded changes, newest first (the CLI's history)."""
    return conn.execute(HISTORY_SQL, {"limit": limit, "offset": offset}).fetchall()


async def recent_changes(pool: Pool, *, limit: int, offset: int) -> list[Row]:
    """Recorded changes, newest first (the API's history); ServiceUnavailable when Postgres cannot answer."""
    try:
        async with pool.connection() as conn:
            cur = await conn.execute(HISTORY_SQL, {"limit": limit, "offset": offset})
            return await cur.fetchall()
    except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
        raise ServiceUnavailable("postgres", "cannot read the threshold history") from exc


def report_by_id(conn: SyncConn, report_id: int) -> StoredReport | None:
    """One stored threshold report; None when there is no such id."""
    return _stored(conn.execute(REPORT_SQL, (report_id,)).fetchone())


def latest_all_sites_report(conn: SyncConn, model_version: str) -> StoredReport | None:
    """The newest all-sites report of a model version; None when there is none."""
    return _stored(conn.execute(LATEST_ALL_SITES_SQL, (model_version,)).fetchone())


def _stored(row: Row | None) -> StoredReport | None:
    return cast(StoredReport | None, row)  # psycopg returns jsonb as a dict
