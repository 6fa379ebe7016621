"""The backfill on a real local Ray, Postgres and demo images: counts, idempotence, equality with the online path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from batch.backfill import run_backfill
from serve_app.reid.embedder import Embedder
from serve_app.reid.gallery import load_gallery
from serve_app.reid.preprocessing import BBox, crop
from tests.batch.conftest import SMALL, Demo, small_options

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


def duplicates(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) AS n FROM (SELECT 1 FROM reid_similarity_scores GROUP BY model_version, detection_id, deer_id"
        " HAVING count(*) > 1) t"
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
    assert duplicates(fresh) == 0
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


def test_backfill_score_equals_the_online_computation_for_the_same_crop(
    demo: Demo, fresh: psycopg.Connection[Any]
) -> None:
    """The online path: full decode, crop, Embedder.embed_crops, the site gallery's max cosine."""
    result = run_backfill(small_options(mode="all", limit=24), settings=demo.settings)
    assert result.detections == 24
    embedder = Embedder(small_options().spec)
    sample = fresh.execute(
        "SELECT d.id, c.site_id, i.uri, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h FROM detections d"
        " JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id"
        " WHERE d.decision <> 'manual' AND d.id IN (SELECT detection_id FROM reid_similarity_scores) ORDER BY d.id"
        " LIMIT 4"
    ).fetchall()
    assert sample
    from PIL import Image

    def embed_missing(rows: Any) -> np.ndarray:
        return embedder.embed_crops([crop(Image.open(demo.image_root / r.uri).convert("RGB"), r.bbox) for r in rows])

    with psycopg.connect(demo.dsn) as conn:
        for det in sample:
            gallery = load_gallery(conn, det["site_id"], model_version=embedder.model_version,
                                   embed_missing=embed_missing)  # fmt: skip
            image = Image.open(demo.image_root / det["uri"]).convert("RGB")
            vector = embedder.embed_crops([crop(image, BBox(det["bbox_x"], det["bbox_y"], det["bbox_w"],
                                                            det["bbox_h"]))])  # fmt: skip
            online = dict(zip(gallery.deer_ids, gallery.score(vector)[0].tolist(), strict=True))
            stored = {
                r["deer_id"]: r["similarity"]
                for r in fresh.execute(
                    "SELECT deer_id, similarity FROM reid_similarity_scores WHERE detection_id = %s", (det["id"],)
                )
            }
            assert stored.keys() == online.keys()
            assert max(abs(stored[k] - online[k]) for k in stored) < 1e-5


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
    assert Path(demo.image_root).is_dir()
    assert SMALL["architecture"] == "resnet18"
