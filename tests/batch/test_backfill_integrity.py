"""What an automatic pass may not do: undo a person's decision, assign to a merged profile, call nothing done."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.rows import tuple_row

from batch.assignments import apply_assignments
from batch.backfill import main, run_backfill
from batch.results import Scored
from serve_app.config import Settings
from serve_app.reid.decision import Thresholds
from serve_app.store.db import connect
from tests import factories
from tests.batch.conftest import Demo, small_options

SMALL_ARGS = ["--model", "resnet18", "--input-size-px", "64", "--batch-size", "16"]


def review(conn: psycopg.Connection[Any], detection_id: int, *, key_id: int) -> None:
    """A reviewer's unassign, written as POST /api/detections/{id}/assignment {"unassign": true} writes it."""
    with conn.transaction():
        before = conn.execute("SELECT deer_id, decision FROM detections WHERE id = %s FOR UPDATE", (detection_id,))
        det = before.fetchone()
        conn.execute(
            "UPDATE detections SET deer_id = NULL, decision = 'unassigned', reviewed_by = %s, reviewed_at = now()"
            " WHERE id = %s",
            (key_id, detection_id),
        )
        conn.execute(
            "INSERT INTO review_events (detection_id, deer_id, action, from_deer_id, to_deer_id, from_decision,"
            " to_decision, api_key_id, actor) VALUES (%s, NULL, 'unassign', %s, NULL, %s, 'unassigned', %s, %s)",
            (detection_id, det["deer_id"], det["decision"], key_id, f"api-key:{key_id}"),
        )


def merge(conn: psycopg.Connection[Any], source: int, *, into: int) -> None:
    """POST /api/deer/{source}/merge's statements, in an open transaction (the caller commits)."""
    conn.execute("SELECT id FROM deer WHERE id = %s FOR UPDATE", (source,))
    conn.execute("SELECT id FROM deer WHERE id = %s FOR UPDATE", (into,))
    conn.execute("UPDATE detections SET deer_id = %s WHERE deer_id = %s", (into, source))
    conn.execute("UPDATE deer SET merged_into = %s WHERE id = %s", (into, source))
    conn.execute(
        "INSERT INTO review_events (deer_id, action, from_deer_id, to_deer_id, actor)"
        " VALUES (%s, 'merge', %s, %s, 'test')",
        (into, source, into),
    )


@pytest.mark.usefixtures("ray_session")
def test_apply_assignments_leaves_a_reviewers_unassign_alone(demo: Demo, fresh: psycopg.Connection[Any]) -> None:
    factories.api_key(fresh)
    key_id = fresh.execute("SELECT max(id) AS id FROM api_keys").fetchone()["id"]
    reviewed = [r["id"] for r in fresh.execute(
        "SELECT id FROM detections WHERE decision <> 'manual' ORDER BY id LIMIT 3"
    )]  # fmt: skip
    for detection_id in reviewed:
        review(fresh, detection_id, key_id=key_id)

    # Accept everything: every detection nobody decided gets its top-1 profile.
    result = run_backfill(
        small_options(mode="all", accept_threshold=-1.0, apply_assignments=True), settings=demo.settings
    )
    assert result.state == "completed" and result.reassigned > 0
    after = fresh.execute(
        "SELECT id, deer_id, decision, reviewed_by FROM detections WHERE id = ANY(%s) ORDER BY id", (reviewed,)
    ).fetchall()
    assert [(r["deer_id"], r["decision"], r["reviewed_by"]) for r in after] == [(None, "unassigned", key_id)] * 3
    touched = fresh.execute(
        "SELECT count(*) AS n FROM review_events WHERE detection_id = ANY(%s) AND action = 'auto_reassign'",
        (reviewed,),
    ).fetchone()["n"]
    assert touched == 0
    assert fresh.execute("SELECT count(*) AS n FROM detections WHERE decision = 'auto'").fetchone()["n"] > 0


def _two_profiles_and_a_detection(conn: psycopg.Connection[Any]) -> tuple[int, int, int, int]:
    """(site, profile A, profile B, an undecided detection of that site)."""
    row = conn.execute(
        "SELECT a.site_id, a.id AS a, b.id AS b FROM deer a JOIN deer b ON b.site_id = a.site_id AND b.id > a.id"
        " WHERE a.merged_into IS NULL AND b.merged_into IS NULL ORDER BY a.id, b.id LIMIT 1"
    ).fetchone()
    det = conn.execute(
        "SELECT d.id FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id"
        " WHERE c.site_id = %s AND d.decision = 'unassigned' AND d.reviewed_at IS NULL ORDER BY d.id LIMIT 1",
        (row["site_id"],),
    ).fetchone()
    return int(row["site_id"]), int(row["a"]), int(row["b"]), int(det["id"])


def _assign(dsn: str, scored: Scored, run_id: uuid.UUID) -> int:
    with psycopg.connect(dsn) as conn, conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        return apply_assignments(cur, [scored], thresholds=Thresholds(accept=0.55), run_id=run_id)


def test_an_assignment_to_a_profile_merged_after_the_galleries_loaded_lands_on_the_survivor(
    demo: Demo, fresh: psycopg.Connection[Any]
) -> None:
    site, merged, survivor, det = _two_profiles_and_a_detection(fresh)
    # The galleries were loaded with both profiles; then a person merges the best match away.
    scored = Scored(det, site, [merged, survivor], np.array([0.9, 0.2], dtype=np.float32))
    with fresh.transaction():
        merge(fresh, merged, into=survivor)
    run_id = uuid.uuid4()
    assert _assign(demo.dsn, scored, run_id) == 1
    row = fresh.execute("SELECT deer_id, decision FROM detections WHERE id = %s", (det,)).fetchone()
    assert (row["deer_id"], row["decision"]) == (survivor, "auto")
    event = fresh.execute(
        "SELECT to_deer_id, deer_id FROM review_events WHERE detection_id = %s AND actor = %s",
        (det, f"backfill:{run_id}"),
    ).fetchone()
    assert (event["to_deer_id"], event["deer_id"]) == (survivor, survivor)


def test_an_assignment_racing_a_merge_waits_for_it_and_lands_on_the_survivor(
    demo: Demo, fresh: psycopg.Connection[Any]
) -> None:
    site, merged, survivor, det = _two_profiles_and_a_detection(fresh)
    scored = Scored(det, site, [merged, survivor], np.array([0.9, 0.2], dtype=np.float32))
    outcome: list[Any] = []
    with connect(demo.dsn) as merging:
        merge(merging, merged, into=survivor)  # holds both profiles FOR UPDATE until it commits
        merge_pid = merging.info.backend_pid
        worker = threading.Thread(target=lambda: outcome.append(_assign(demo.dsn, scored, uuid.uuid4())))
        worker.start()
        deadline = time.monotonic() + 60
        # Commit the merge once the assignment waits for it (or has finished without waiting).
        while worker.is_alive() and time.monotonic() < deadline:
            waiting = fresh.execute(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (merge_pid,)
            ).fetchone()["n"]
            if waiting:
                break
            time.sleep(0.01)
        merging.commit()
        worker.join(timeout=60)
    assert outcome == [1]
    row = fresh.execute("SELECT deer_id, decision FROM detections WHERE id = %s", (det,)).fetchone()
    assert (row["deer_id"], row["decision"]) == (survivor, "auto")
    on_merged = fresh.execute("SELECT count(*) AS n FROM detections WHERE deer_id = %s", (merged,)).fetchone()["n"]
    assert on_merged == 0


@pytest.mark.usefixtures("ray_session", "keep_sigterm")
def test_a_backfill_that_could_score_nothing_ends_failed_with_the_reason(
    demo: Demo, fresh: psycopg.Connection[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty_root = tmp_path / "no-images"
    empty_root.mkdir()
    settings = Settings(environment="test", database_url=demo.dsn, image_root=empty_root)
    result = run_backfill(small_options(mode="all", limit=12), settings=settings)
    assert (result.state, result.detections, result.failed) == ("failed", 0, 12)
    run = fresh.execute("SELECT state, error, done, failed FROM backfill_runs WHERE id = %s", (result.run_id,))
    row = run.fetchone()
    assert (row["state"], row["done"], row["failed"]) == ("failed", 0, 12)
    assert row["error"].startswith("no detection could be scored: 12 images unreadable")

    rc = main(["--mode", "all", "--limit", "5", *SMALL_ARGS, "--database-url", demo.dsn,
               "--image-root", str(empty_root)])  # fmt: skip
    out = capsys.readouterr()
    assert rc != 0
    assert ": failed," in out.out and "no detection could be scored: 5 images unreadable" in out.err
    states = [r["state"] for r in fresh.execute("SELECT state FROM backfill_runs ORDER BY started_at")]
    assert states == ["failed", "failed"]
