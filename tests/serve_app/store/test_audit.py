"""Review audit rows outlive what they describe, and never stop a detection, deer or site from being deleted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from batch.demo_data import DemoParams, load_demo
from tests import factories

# The events an assignment and a merge write (serve_app/store/audit.py), without a site: the row names the
# detection or deer it is about, and the trigger takes the site from it.
ASSIGN_EVENT_SQL = (
    "INSERT INTO review_events (detection_id, deer_id, action, from_deer_id, to_deer_id, from_decision, to_decision,"
    " api_key_id, actor) VALUES (%s, %s, 'assign', NULL, %s, 'unassigned', 'manual', NULL, 'api-key:1') RETURNING id"
)
MERGE_EVENT_SQL = (
    "INSERT INTO review_events (deer_id, action, from_deer_id, to_deer_id, api_key_id, actor)"
    " VALUES (%s, 'merge', %s, %s, NULL, 'api-key:1') RETURNING id"
)


def _merge(db: psycopg.Connection[Any], source: int, into: int) -> int:
    db.execute("UPDATE detections SET deer_id = %s WHERE deer_id = %s", (into, source))
    db.execute("UPDATE deer SET merged_into = %s WHERE id = %s", (into, source))
    return int(db.execute(MERGE_EVENT_SQL, (into, source, into)).fetchone()["id"])


def _assign(db: psycopg.Connection[Any], detection: int, deer: int) -> int:
    db.execute("UPDATE detections SET deer_id = %s, decision = 'manual' WHERE id = %s", (deer, detection))
    return int(db.execute(ASSIGN_EVENT_SQL, (detection, deer, deer)).fetchone()["id"])


def _events(db: psycopg.Connection[Any]) -> dict[int, dict[str, Any]]:
    rows = db.execute(
        "SELECT id, site_id, action, detection_id, deer_id, from_deer_id, to_deer_id FROM review_events"
    ).fetchall()
    return {r["id"]: r for r in rows}


def _site_with_a_merge(db: psycopg.Connection[Any]) -> tuple[int, int, int, int, int, int]:
    """A site whose detection was assigned by hand and whose first deer was merged into the second."""
    site = factories.site(db)
    image = factories.image(db, camera_id=factories.camera(db, site_id=site))
    kept, merged = factories.deer(db, site_id=site), factories.deer(db, site_id=site)
    det = factories.detection(db, image_id=image)
    assign_event = _assign(db, det, merged)
    merge_event = _merge(db, merged, kept)
    return site, det, kept, merged, assign_event, merge_event


def test_deleting_a_detection_keeps_its_review_events(db: psycopg.Connection[Any]) -> None:
    site = factories.site(db)
    det = factories.detection(db, image_id=factories.image(db, camera_id=factories.camera(db, site_id=site)))
    deer = factories.deer(db, site_id=site)
    event = _assign(db, det, deer)
    db.execute("DELETE FROM detections WHERE id = %s", (det,))
    kept = _events(db)[event]
    assert (kept["action"], kept["detection_id"], kept["deer_id"], kept["site_id"]) == ("assign", det, deer, site)


def test_a_site_with_a_merge_is_deleted_and_its_audit_rows_remain(db: psycopg.Connection[Any]) -> None:
    site, det, kept, merged, assign_event, merge_event = _site_with_a_merge(db)
    other = factories.site(db)
    db.execute("DELETE FROM sites WHERE id = %s", (site,))
    assert db.execute("SELECT count(*) AS n FROM deer WHERE site_id = %s", (site,)).fetchone()["n"] == 0
    events = _events(db)
    assert events[assign_event]["detection_id"] == det and events[assign_event]["site_id"] == site
    merge = events[merge_event]
    assert (merge["action"], merge["from_deer_id"], merge["to_deer_id"], merge["site_id"]) == (
        "merge",
        merged,
        kept,
        site,
    )
    assert db.execute("SELECT id FROM sites").fetchall() == [{"id": other}]


def test_deleting_a_merged_deer_or_one_with_events_is_not_blocked_by_them(db: psycopg.Connection[Any]) -> None:
    site, det, kept, merged, _, merge_event = _site_with_a_merge(db)
    db.execute("DELETE FROM deer WHERE id = %s", (merged,))
    db.execute("DELETE FROM detections WHERE id = %s", (det,))
    db.execute("DELETE FROM deer WHERE id = %s", (kept,))
    assert _events(db)[merge_event]["site_id"] == site and len(_events(db)) == 2


def test_a_deer_still_assigned_to_a_detection_cannot_be_deleted(db: psycopg.Connection[Any]) -> None:
    site = factories.site(db)
    deer = factories.deer(db, site_id=site)
    factories.detection(db, image_id=factories.image(db, camera_id=factories.camera(db, site_id=site)), deer_id=deer)
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute("DELETE FROM deer WHERE id = %s", (deer,))


def test_an_event_about_nothing_that_exists_is_refused(db: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="review event"):
        db.execute(ASSIGN_EVENT_SQL, (999999, None, None))
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="review event"):
        db.execute(MERGE_EVENT_SQL, (999998, 999999, 999998))
    assert _events(db) == {}


def test_a_demo_set_with_a_merge_is_reloaded_and_its_audit_rows_name_no_new_row(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    params = DemoParams(sites=1, cameras=1, deer=2, images=12, seed=5)
    load_demo(database_url, image_root=tmp_path, params=params, workers=1)
    first, second = (r["id"] for r in db.execute("SELECT id FROM deer ORDER BY id").fetchall())
    det = db.execute("SELECT id FROM detections WHERE deer_id IS NULL ORDER BY id LIMIT 1").fetchone()["id"]
    assign_event = _assign(db, det, first)
    merge_event = _merge(db, first, second)
    db.execute("DELETE FROM images WHERE id = (SELECT max(id) FROM images)")  # no longer the whole set
    assert load_demo(database_url, image_root=tmp_path, params=params, workers=1)["loaded"] is True
    assert db.execute("SELECT count(*) AS n FROM images").fetchone()["n"] == params.images
    events = _events(db)
    assert set(events) == {assign_event, merge_event}
    # The reloaded rows have ids of their own: an audit row never comes to describe a row it did not.
    named = db.execute(
        "SELECT (SELECT count(*) FROM detections WHERE id = %s) AS detections,"
        " (SELECT count(*) FROM deer WHERE id = ANY(%s)) AS deer",
        (det, [first, second]),
    ).fetchone()
    assert named == {"detections": 0, "deer": 0}
