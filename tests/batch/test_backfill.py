"""The backfill on a real local Ray, Postgres and demo images: counts, idempotence, equality with the online path."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from batch.backfill import run_backfill
from serve_app.images import decode_image, read_limited, resolve_image_uri
from serve_app.reid.embedder import Embedder
from serve_app.reid.identification import Identification, IdentifyRequest
from serve_app.reid.identifier import Identifier, IdentifierOptions
from serve_app.reid.preprocessing import BBox, crop
from serve_app.reid.score_buffer import ScoreBuffer
from serve_app.store.db import make_pool
from tests.batch.conftest import Demo, small_options
from tests.helpers import score_duplicates

pytestmark = pytest.mark.usefixtures("ray_session")


def expected_rows(conn: psycopg.Connection[Any]) -> int:
    """Detections x profiles of their site (profiles: unmerged deer with a gallery)."""
    row = conn.execute(
        "SELECT sum(p.n) AS n FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id"
        " JOIN (SELECT site_id, count(*) AS n FROM deer WHERE merged_into IS NULL"
        "       AND EXISTS (SELECT 1 FROM detections g WHERE g.deer_id = deer.id) GROUP BY site_id) p"
        " ON p.site_id = c.site_id"
    ).fetchone()
    return int(row["n"])


def test_backfill_scores_every_detection_against_its_site_profiles_then_missing_writes_nothing(
    demo: Demo, fresh: psycopg.Connection[Any]
) -> None:
    result = run_backfill(small_options(mode="all"), settings=demo.settings, progress_interval_s=0.5)
    n_detections = fresh.execute("SELECT count(*) AS n FROM detections").fetchone()["n"]
    assert result.state == "completed" and result.total == n_detections == result.detections
    assert result.score_rows == expected_rows(fresh) > 0
    assert fresh.execute("SELECT count(*) AS n FROM reid_similarity_scores").fetchone()["n"] == result.score_rows
    assert score_duplicates(fresh) == 0
    run = fresh.execute("SELECT * FROM backfill_runs WHERE id = %s", (result.run_id,)).fetchone()
    assert (run["state"], run["done"], run["total"], run["score_rows"]) == ("completed", n_detections, n_detections,
                                                                            result.score_rows)  # fmt: skip
    assert run["model_version"] == "resnet18-random-seed7-64" and run["parameters"]["mode"] == "all"
    # Rank 1 is the best profile, ranks are 1..K per detection; all rows are backfill rows of this run.
    bad = fresh.execute(
        "SELECT count(*) AS n FROM reid_similarity_scores s WHERE s.rank = 1 AND s.similarity < (SELECT max(similarity)"
        " FROM reid_similarity_scores t WHERE t.detection_id = s.detection_id)"
    ).fetchone()["n"]
    assert bad == 0
    assert {r["source"] for r in fresh.execute("SELECT DISTINCT source FROM reid_similarity_scores")} == {"backfill"}

    again = run_backfill(small_options(mode="missing"), settings=demo.settings)
    assert (again.total, again.detections, again.score_rows) == (0, 0, 0)
    assert fresh.execute("SELECT count(*) AS n FROM reid_similarity_scores").fetchone()["n"] == result.score_rows


async def identify_online(demo: Demo, detections: list[dict[str, Any]]) -> list[Identification]:
    """The same crops identified by the online Identifier, as the ReID deployment builds and calls it."""
    options = small_options()
    pool = make_pool(demo.dsn)
    await pool.open()
    buffer = ScoreBuffer(demo.dsn)
    buffer.start()
    identifier = Identifier(
        Embedder(options.spec),
        pool=pool,
        scores=buffer,
        options=IdentifierOptions(image_root=demo.image_root, top_k=100),
        thresholds=options.thresholds,
    )
    requests = []
    for det in detections:
        # What POST /api/detections does with an image_uri: resolve, read, decode and verify, crop.
        path, rel = resolve_image_uri(det["uri"], root=demo.image_root)
        image = decode_image(read_limited(path, max_bytes=demo.settings.max_image_bytes),
                             max_pixels=demo.settings.max_image_pixels)  # fmt: skip
        bbox = BBox(det["bbox_x"], det["bbox_y"], det["bbox_w"], det["bbox_h"])
        requests.append(IdentifyRequest(
            site_id=det["site_id"], camera_id=det["camera_id"], image_uri=rel, captured_at=det["captured_at"],
            width=image.width, height=image.height, bbox=bbox, crop=crop(image, bbox),
        ))  # fmt: skip
    try:
        return await identifier.identify_batch(requests)
    finally:
        await buffer.close()
        await pool.close()


def score_log(conn: psycopg.Connection[Any], detection_id: int, *, source: str) -> dict[int, tuple[Any, ...]]:
    """deer id -> (similarity, rank, matched, threshold, model version) of one detection's logged rows."""
    rows = conn.execute(
        "SELECT deer_id, similarity, rank, matched, threshold, model_version FROM reid_similarity_scores"
        " WHERE detection_id = %s AND source = %s",
        (detection_id, source),
    )
    return {r["deer_id"]: (r["similarity"], r["rank"], r["matched"], r["threshold"], r["model_version"]) for r in rows}


def test_backfill_scores_equal_what_the_online_identifier_computes_for_the_same_crops(
    demo: Demo, fresh: psycopg.Connection[Any]
) -> None:
    result = run_backfill(small_options(mode="all", limit=24), settings=demo.settings)
    assert result.detections == 24
    sample = fresh.execute(
        "SELECT d.id, c.site_id, i.camera_id, i.uri, i.captured_at, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h"
        " FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id"
        " WHERE d.decision <> 'manual' AND d.id IN (SELECT detection_id FROM reid_similarity_scores) ORDER BY d.id"
        " LIMIT 6"
    ).fetchall()
    assert len({det["site_id"] for det in sample}) == 2
    answers = asyncio.run(identify_online(demo, sample))
    try:
        for det, answer in zip(sample, answers, strict=True):
            backfill = score_log(fresh, det["id"], source="backfill")
            online = score_log(fresh, answer.detection_id, source="online")
            assert backfill and backfill.keys() == online.keys() == {c.deer_id for c in answer.candidates}
            for deer_id, (similarity, *rest) in backfill.items():
                assert abs(similarity - online[deer_id][0]) < 1e-5
                assert rest == list(online[deer_id][1:])  # same rank, decision, threshold and model version
            best = min(backfill, key=lambda deer_id: backfill[deer_id][1])
            assert answer.top1_similarity == pytest.approx(backfill[best][0], abs=1e-5)
    finally:
        fresh.execute("DELETE FROM detections WHERE id = ANY(%s)", ([a.detection_id for a in answers],))


def test_dry_run_writes_nothing_and_reports_a_sample(demo: Demo, fresh: psycopg.Connection[Any]) -> None:
    result = run_backfill(small_options(mode="all", limit=20), settings=demo.settings, dry_run=True)
    assert result.run_id is None and result.detections == 20 and result.score_rows > 0
    assert sum(result.dry_run["decisions"].values()) == 20 and result.dry_run["sample"]
    for table in ("reid_similarity_scores", "backfill_runs", "review_events"):
        assert fresh.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"] == 0
    assert fresh.execute("SELECT count(*) AS n FROM detections WHERE embedding IS NOT NULL").fetchone()["n"] == 0


def test_apply_assignments_never_touches_manual_and_records_every_change(
    demo: Demo, fresh: psycopg.Connection[Any]
) -> None:
    manual_before = fresh.execute("SELECT id, deer_id FROM detections WHERE decision = 'manual' ORDER BY id").fetchall()
    # Accept everything: every automatic detection gets its top-1 profile.
    result = run_backfill(
        small_options(mode="all", accept_threshold=-1.0, apply_assignments=True, store_embeddings=True),
        settings=demo.settings,
    )
    manual_after = fresh.execute("SELECT id, deer_id FROM detections WHERE decision = 'manual' ORDER BY id").fetchall()
    assert manual_after == manual_before
    auto = fresh.execute("SELECT count(*) AS n FROM detections WHERE decision = 'auto'").fetchone()["n"]
    events = fresh.execute(
        "SELECT count(*) AS n, count(DISTINCT detection_id) AS d FROM review_events WHERE action = 'auto_reassign'"
    ).fetchone()
    assert auto == result.reassigned == events["n"] == events["d"] > 0
    mismatched = fresh.execute(
        "SELECT count(*) AS n FROM detections d JOIN reid_similarity_scores s ON s.detection_id = d.id AND s.rank = 1"
        " WHERE d.decision = 'auto' AND (s.deer_id <> d.deer_id OR NOT s.matched)"
    ).fetchone()["n"]
    assert mismatched == 0
    assert fresh.execute("SELECT count(*) AS n FROM detections WHERE embedding IS NULL").fetchone()["n"] == 0
