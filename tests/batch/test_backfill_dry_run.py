"""A dry run writes nothing to Postgres or Redis, whatever other options it is given (resume included)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
import redis

from batch.backfill import main, run_backfill
from serve_app.config import Settings
from tests.batch.conftest import Demo, small_options

pytestmark = pytest.mark.usefixtures("ray_session")


def database_state(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, str]]:
    """Row count and a digest of every row, per table: any insert, update or delete changes it."""
    tables = [r["tablename"] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    state = {}
    for table in sorted(tables):
        row = conn.execute(
            f"SELECT count(*) AS n, md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) AS digest"
            f' FROM "{table}" t'
        ).fetchone()
        state[table] = (int(row["n"]), str(row["digest"]))
    return state


def runs(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM backfill_runs ORDER BY id").fetchall()


@pytest.fixture
def stopped_run(demo: Demo, fresh: psycopg.Connection[Any]) -> uuid.UUID:
    """A run that scored a few detections and was then interrupted (as `ray job stop` leaves it)."""
    result = run_backfill(small_options(mode="all", limit=30, rows_per_block=8), settings=demo.settings)
    assert result.run_id is not None
    fresh.execute(
        "DELETE FROM reid_similarity_scores WHERE run_id = %s AND detection_id IN (SELECT DISTINCT detection_id FROM"
        " reid_similarity_scores WHERE run_id = %s ORDER BY detection_id DESC LIMIT 10)",
        (result.run_id, result.run_id),
    )
    fresh.execute(
        "UPDATE backfill_runs SET state = 'interrupted', error = 'KeyboardInterrupt: signal 15' WHERE id = %s",
        (result.run_id,),
    )
    return result.run_id


@pytest.mark.parametrize(
    "extra",
    [
        {"mode": "all", "limit": 20},
        {"mode": "all", "accept_threshold": -1.0, "apply_assignments": True, "store_embeddings": True},
        {"mode": "missing", "sites": "first", "review_threshold": 0.2},
    ],
    ids=["plain", "assign-and-store-embeddings", "one-site-missing"],
)
def test_dry_run_changes_no_table_and_no_redis_key(
    demo: Demo, fresh: psycopg.Connection[Any], stopped_run: uuid.UUID, redis_url: str, extra: dict[str, Any]
) -> None:
    if extra.get("sites") == "first":
        extra = {**extra, "sites": (fresh.execute("SELECT min(id) AS id FROM sites").fetchone()["id"],)}
    settings = Settings(environment="test", database_url=demo.dsn, image_root=demo.image_root, redis_url=redis_url)
    cache = redis.Redis.from_url(redis_url)
    before, runs_before, keys_before = database_state(fresh), runs(fresh), cache.dbsize()

    result = run_backfill(small_options(**extra), settings=settings, dry_run=True)

    assert result.run_id is None and result.detections > 0 and result.score_rows > 0
    assert database_state(fresh) == before
    assert runs(fresh) == runs_before
    assert cache.dbsize() == keys_before


def test_dry_run_of_a_resume_leaves_the_run_as_it_was(
    demo: Demo, fresh: psycopg.Connection[Any], stopped_run: uuid.UUID, redis_url: str
) -> None:
    settings = Settings(environment="test", database_url=demo.dsn, image_root=demo.image_root, redis_url=redis_url)
    cache = redis.Redis.from_url(redis_url)
    before, runs_before, keys_before = database_state(fresh), runs(fresh), cache.dbsize()

    result = run_backfill(None, settings=settings, dry_run=True, resume=stopped_run)

    # It shows what the resume would do: the 10 detections whose rows are missing.
    assert (result.run_id, result.total, result.detections) == (None, 10, 10)
    assert database_state(fresh) == before
    assert runs(fresh) == runs_before and runs_before[0]["state"] == "interrupted"
    assert cache.dbsize() == keys_before


@pytest.mark.usefixtures("keep_sigterm")
def test_cli_dry_run_resume_prints_the_plan_and_writes_nothing(
    demo: Demo,
    fresh: psycopg.Connection[Any],
    stopped_run: uuid.UUID,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TRAILCAM_REDIS_URL", redis_url)
    cache = redis.Redis.from_url(redis_url)
    before, runs_before, keys_before = database_state(fresh), runs(fresh), cache.dbsize()

    rc = main(["--dry-run", "--resume", str(stopped_run), "--database-url", demo.dsn,
               "--image-root", str(demo.image_root)])  # fmt: skip

    assert rc == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written" in out and "detections 10 of 10" in out
    assert database_state(fresh) == before
    assert runs(fresh) == runs_before
    assert cache.dbsize() == keys_before
