"""Migrations: applied in order once, recorded, and the analysis indexes exist with their comments."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from serve_app.errors import MigrationError
from serve_app.store.migrate import MIGRATIONS_DIR, apply_migrations, discover
from tests import factories

ANALYSIS_INDEXES = {
    "reid_scores_detection_idx",
    "reid_scores_deer_idx",
    "reid_scores_similarity_idx",
    "reid_scores_computed_at_idx",
    "reid_scores_model_source_idx",
    "reid_scores_top1_idx",
    "reid_scores_run_unique_idx",
}


def test_second_apply_is_a_no_op(database_url: str, db: psycopg.Connection[Any]) -> None:
    before = db.execute("SELECT version, applied_at FROM schema_migrations ORDER BY version").fetchall()
    assert apply_migrations(database_url) == []
    after = db.execute("SELECT version, applied_at FROM schema_migrations ORDER BY version").fetchall()
    assert before == after
    assert [r["version"] for r in after] == [m.version for m in discover()]


def test_similarity_log_has_the_seven_analysis_indexes(db: psycopg.Connection[Any]) -> None:
    rows = db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'reid_similarity_scores'").fetchall()
    assert ANALYSIS_INDEXES <= {r["indexname"] for r in rows}


def test_every_analysis_index_is_commented_with_its_query() -> None:
    text = "\n".join(p.read_text() for p in sorted(MIGRATIONS_DIR.glob("*.sql")))
    lines = text.splitlines()
    for name in ANALYSIS_INDEXES:
        line_no = next(i for i, line in enumerate(lines) if re.search(rf"INDEX {name}\b", line))
        assert lines[line_no - 1].startswith("-- Query:"), name


def test_constraints_reject_bad_rows(db: psycopg.Connection[Any]) -> None:
    site = db.execute("INSERT INTO sites (name) VALUES ('s') RETURNING id").fetchone()["id"]
    cam = db.execute("INSERT INTO cameras (site_id, name) VALUES (%s, 'c') RETURNING id", (site,)).fetchone()["id"]
    img = db.execute(
        "INSERT INTO images (camera_id, uri, captured_at, width, height) VALUES (%s, 'a.jpg', now(), 10, 10)"
        " RETURNING id",
        (cam,),
    ).fetchone()["id"]
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h) VALUES (%s, 0.5, 0.5, 0.7, 0.1)", (img,)
        )
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute("INSERT INTO cameras (site_id, name) VALUES (999999, 'x')")
    column_types = {
        r["data_type"]
        for r in db.execute(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND data_type LIKE 'timestamp%'"
        )
    }
    assert column_types == {"timestamp with time zone"}


def test_a_failing_migration_is_rolled_back_and_not_recorded(database_url: str, tmp_path: Path) -> None:
    for m in discover():
        (tmp_path / m.name).write_text(m.path.read_text())
    (tmp_path / "900_broken.sql").write_text("CREATE TABLE half_done (id int); SELECT * FROM no_such_table;")
    with pytest.raises(MigrationError, match=r"900_broken\.sql"):
        apply_migrations(database_url, directory=tmp_path)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM schema_migrations WHERE version = 900").fetchone() == (0,)


def test_badly_named_migration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "one.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match=r"001_name\.sql"):
        discover(tmp_path)


def _scored_detection(db: psycopg.Connection[Any], name: str) -> tuple[int, int, int]:
    """A site with one deer and one detection that has a score row against it; returns (site, detection, deer)."""
    site = factories.site(db, name=name)
    img = factories.image(db, camera_id=factories.camera(db, site_id=site))
    deer = factories.deer(db, site_id=site)
    det = factories.detection(db, image_id=img)
    _insert_score(db, det, deer)
    return site, det, deer


def _insert_score(db: psycopg.Connection[Any], detection_id: int, deer_id: int) -> None:
    db.execute(
        "INSERT INTO reid_similarity_scores (detection_id, deer_id, similarity, rank, threshold, matched,"
        " model_version, source) VALUES (%s, %s, 0.5, 1, 0.55, false, 'm', 'online')",
        (detection_id, deer_id),
    )


def _scores(db: psycopg.Connection[Any]) -> set[tuple[int, int]]:
    return {(r["detection_id"], r["deer_id"]) for r in db.execute("SELECT * FROM reid_similarity_scores")}


def test_score_rows_must_reference_an_existing_detection_and_deer(db: psycopg.Connection[Any]) -> None:
    _site, det, deer = _scored_detection(db, "refs")
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="detection 999999"):
        _insert_score(db, 999999, deer)
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="deer 999999"):
        _insert_score(db, det, 999999)
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="deer 999999"):
        db.execute("UPDATE reid_similarity_scores SET deer_id = 999999")
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="its id cannot change"):
        db.execute("UPDATE detections SET id = 999999 WHERE id = %s", (det,))
    assert _scores(db) == {(det, deer)}


def test_deleting_a_detection_a_deer_or_a_site_deletes_their_scores(db: psycopg.Connection[Any]) -> None:
    _, det_a, deer_a = _scored_detection(db, "a")
    site_b, det_b, deer_b = _scored_detection(db, "b")
    _, det_c, deer_c = _scored_detection(db, "c")
    _insert_score(db, det_a, deer_c)  # a score may name a deer of another detection's row
    db.execute("DELETE FROM detections WHERE id = %s", (det_a,))
    assert _scores(db) == {(det_b, deer_b), (det_c, deer_c)}
    db.execute("DELETE FROM sites WHERE id = %s", (site_b,))  # cascades through cameras, images, detections, deer
    assert _scores(db) == {(det_c, deer_c)}
    db.execute("DELETE FROM deer WHERE id = %s", (deer_c,))
    assert _scores(db) == set()
    _insert_score(db, det_c, deer_a)
    db.execute("TRUNCATE detections CASCADE")
    assert _scores(db) == set()


def test_a_detection_deleted_while_its_scores_are_written_takes_them_along(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    _, det, deer = _scored_detection(db, "race")
    with psycopg.connect(database_url) as writer, psycopg.connect(database_url, autocommit=True) as deleter:
        _insert_score(writer, det, deer)  # uncommitted: holds the detection FOR KEY SHARE
        deleter.execute("SET statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            deleter.execute("DELETE FROM detections WHERE id = %s", (det,))  # waits for the writer
        writer.commit()
        deleter.execute("SET statement_timeout = 0")
        deleter.execute("DELETE FROM detections WHERE id = %s", (det,))
    assert _scores(db) == set()
