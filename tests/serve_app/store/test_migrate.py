"""Migrations: applied in order once, recorded, and the analysis indexes exist with their comments."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from serve_app.errors import MigrationError
from serve_app.store.migrate import MIGRATIONS_DIR, apply_migrations, discover

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
