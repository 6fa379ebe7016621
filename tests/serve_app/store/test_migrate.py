"""Migrations: applied in order once, recorded, never edited once applied; old databases upgrade to today's schema."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from serve_app.errors import MigrationError
from serve_app.store.db import connect, database_name, drop_database, with_database
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


# Migration files as main once shipped them (tests/serve_app/store/historical_migrations/, copied from git so
# the tests need no git): each state is a database some checkout may have migrated and must upgrade from.
HISTORY = Path(__file__).with_name("historical_migrations")
HISTORICAL_STATES = {
    # 60f190e: the first 005 and the 006 that ff89717 renamed and rewrote under the same number.
    "60f190e": {"005_score_reference_checks.sql": "005_score_reference_checks.60f190e.sql",
                "006_site_delete_bumps.sql": "006_site_delete_bumps.60f190e.sql"},
    "ff89717": {"005_score_reference_checks.sql": "005_score_reference_checks.60f190e.sql",
                "006_site_delete.sql": "006_site_delete.ff89717.sql"},
    "74fb0fa": {"005_score_reference_checks.sql": "005_score_reference_checks.74fb0fa.sql",
                "006_site_delete.sql": "006_site_delete.ff89717.sql"},
    "old-006-over-today's-005": {"006_site_delete_bumps.sql": "006_site_delete_bumps.60f190e.sql"},
}  # fmt: skip

SCHEMA_QUERIES = {
    "columns": """
        SELECT c.relname, array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                    || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
                                    || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
                                    || coalesce(' IDENTITY ' || nullif(a.attidentity::text, ''), '') ORDER BY a.attnum)
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
          AND a.attnum > 0 AND NOT a.attisdropped
        GROUP BY c.relname""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), condeferrable, condeferred
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
    "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid), tgenabled::text
        FROM pg_trigger WHERE NOT tgisinternal""",
    "functions": """
        SELECT proname, pg_get_function_identity_arguments(oid), pg_get_functiondef(oid)
        FROM pg_proc WHERE pronamespace = 'public'::regnamespace""",
    "sequences": "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'S'",
}


def _schema(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Everything pg_catalog says about the public schema (rows sorted, so two databases compare)."""
    with psycopg.connect(dsn) as conn:
        return {
            name: sorted(tuple(tuple(v) if isinstance(v, list) else v for v in row) for row in conn.execute(query))
            for name, query in SCHEMA_QUERIES.items()
        }


@pytest.fixture
def scratch_dsns(database_url: str) -> Iterator[Callable[[str], str]]:
    """Fresh database names next to the session's; dropped at the end."""
    made: list[str] = []

    def make(suffix: str) -> str:
        made.append(with_database(database_url, f"{database_name(database_url)}_{suffix}"))
        return made[-1]

    yield make
    for dsn in made:
        drop_database(dsn)


@pytest.mark.parametrize("state", sorted(HISTORICAL_STATES))
def test_a_database_migrated_by_an_earlier_main_upgrades_to_the_same_schema(
    state: str, scratch_dsns: Callable[[str], str], tmp_path: Path
) -> None:
    old_files = HISTORICAL_STATES[state]
    for migration in discover():
        if migration.version <= 6 and not any(n[:3] == migration.name[:3] for n in old_files):
            (tmp_path / migration.name).write_text(migration.path.read_text())
    for name, stored in old_files.items():
        (tmp_path / name).write_text((HISTORY / stored).read_text())
    fresh, upgraded = scratch_dsns("fresh"), scratch_dsns("upgraded")
    apply_migrations(fresh)
    assert apply_migrations(upgraded, directory=tmp_path)[-1] in old_files | {"006_site_delete.sql": ""}
    with connect(upgraded, autocommit=True) as conn:
        conn.execute("ALTER TABLE schema_migrations DROP COLUMN checksum")  # the runner of that time kept none
        site = factories.site(conn)
        kept, merged = factories.deer(conn, site_id=site), factories.deer(conn, site_id=site)
        det = factories.detection(conn, image_id=factories.image(conn, camera_id=factories.camera(conn, site_id=site)))
        conn.execute(
            "INSERT INTO review_events (detection_id, deer_id, action, actor) VALUES (%s, %s, 'assign', 'a'),"
            " (NULL, %s, 'merge', 'a')",
            (det, kept, kept),
        )
        conn.execute("UPDATE deer SET merged_into = %s WHERE id = %s", (kept, merged))
    applied = apply_migrations(upgraded)
    assert applied and all(int(name[:3]) > 6 for name in applied)
    with connect(upgraded) as conn:
        events = conn.execute("SELECT action, site_id FROM review_events ORDER BY id").fetchall()
        assert events == [{"action": "assign", "site_id": site}, {"action": "merge", "site_id": site}]
        conn.execute("DELETE FROM sites WHERE id = %s", (site,))
    have, want = _schema(upgraded), _schema(fresh)
    for kind in SCHEMA_QUERIES:
        assert set(have[kind]) ^ set(want[kind]) == set(), kind
        assert have[kind] == want[kind], kind


def test_an_applied_migration_that_was_edited_is_refused(database_url: str, tmp_path: Path) -> None:
    for m in discover():
        (tmp_path / m.name).write_text(m.path.read_text())
    last = discover()[-1]
    (tmp_path / last.name).write_text(last.path.read_text() + "\n-- an edit after the fact\n")
    with pytest.raises(MigrationError, match=rf"{last.name} was edited after it was applied"):
        apply_migrations(database_url, directory=tmp_path)


def test_an_applied_migration_that_was_renamed_is_refused(database_url: str, tmp_path: Path) -> None:
    for m in discover():
        (tmp_path / m.name).write_text(m.path.read_text())
    last = discover()[-1]
    (tmp_path / last.name).rename(tmp_path / f"{last.version:03d}_another_name.sql")
    with pytest.raises(MigrationError, match=rf"applied as {last.name}"):
        apply_migrations(database_url, directory=tmp_path)
