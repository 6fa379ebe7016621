"""The score buffer against real Postgres: refused references and commits whose outcome the writer never heard."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest

from serve_app.reid.score_buffer import BufferLimits, ScoreBuffer
from serve_app.reid.scores import ScoreRow, score_rows
from tests import factories
from tests.fixtures.ray_cluster import free_port
from tests.serve_app.reid.pgproxy import CommitFault, PgProxy
from tests.waiting import wait_until_async


def logged_rows(
    conn: psycopg.Connection[Any], *, detections: int, profiles: int
) -> tuple[list[int], list[int], list[ScoreRow]]:
    """Detections and deer of one site, and one score row per detection x deer."""
    site = factories.site(conn)
    image = factories.image(conn, camera_id=factories.camera(conn, site_id=site))
    deer = [factories.deer(conn, site_id=site) for _ in range(profiles)]
    dets = [factories.detection(conn, image_id=image) for _ in range(detections)]
    rows = [
        r
        for d in dets
        for r in score_rows(
            d,
            deer_ids=deer,
            similarities=np.linspace(-0.1, 0.9, profiles),
            threshold=0.5,
            assigned_deer_id=None,
            model_version="m",
        )
    ]
    return dets, deer, rows


def score_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    row = conn.execute(
        "SELECT count(*) AS n, count(DISTINCT (detection_id, deer_id)) AS pairs FROM reid_similarity_scores"
    ).fetchone()
    assert row is not None
    return {"n": int(row["n"]), "pairs": int(row["pairs"])}


def test_rows_of_a_deleted_detection_or_deer_are_dropped_and_counted_and_the_rest_of_the_chunk_lands(
    db: psycopg.Connection[Any], database_url: str
) -> None:
    """One chunk of 1,000 rows; a detection and a deer are deleted before it is written: only their 109 rows go."""
    dets, deer, rows = logged_rows(db, detections=100, profiles=10)
    reasons: list[tuple[int, str]] = []
    buffer = ScoreBuffer(
        database_url, limits=BufferLimits(flush_rows=5_000), on_dropped=lambda n, reason: reasons.append((n, reason))
    )
    buffer.add(rows)
    db.execute("DELETE FROM detections WHERE id = %s", (dets[3],))
    db.execute("DELETE FROM deer WHERE id = %s", (deer[7],))

    async def scenario() -> int:
        written = await buffer.flush_once()
        await buffer.close()
        return written

    written = asyncio.run(scenario())
    orphans = 10 + 100 - 1  # det 3's rows, deer 7's rows, one row in both
    assert score_counts(db) == {"n": 1_000 - orphans, "pairs": 1_000 - orphans}
    gone = db.execute(
        "SELECT count(*) AS n FROM reid_similarity_scores WHERE detection_id = %s OR deer_id = %s", (dets[3], deer[7])
    ).fetchone()
    assert gone == {"n": 0}
    assert written == buffer.stats.written == 1_000 - orphans
    assert (buffer.stats.dropped, buffer.pending) == (orphans, 0)
    assert buffer.stats.dropped_by_reason == {"reference_missing": orphans}
    assert reasons == [(orphans, "reference_missing")]


def test_rows_whose_references_all_vanished_are_all_dropped_and_the_queue_goes_on(
    db: psycopg.Connection[Any], database_url: str
) -> None:
    """A chunk whose every detection is gone is discarded and counted; the next chunk is written."""
    dets, _deer, rows = logged_rows(db, detections=4, profiles=5)
    counted: list[int] = []
    buffer = ScoreBuffer(database_url, limits=BufferLimits(flush_rows=10), on_written=counted.append)
    buffer.add(rows)
    db.execute("DELETE FROM detections WHERE id = ANY(%s)", (dets[:2],))

    async def scenario() -> list[int]:
        results = [await buffer.flush_once(), await buffer.flush_once()]
        await buffer.close()
        return results

    assert asyncio.run(scenario()) == [0, 10]
    assert score_counts(db) == {"n": 10, "pairs": 10}
    assert (buffer.stats.written, buffer.stats.dropped, buffer.stats.failed_flushes) == (10, 10, 0)
    assert counted == [10]  # the metric callbacks get positive counts only (a Ray counter refuses 0)


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    p = PgProxy(free_port())
    yield p
    p.close()


@pytest.mark.parametrize("fault", ["lost_after", "lost_before", "stall"])
def test_a_commit_whose_outcome_the_writer_never_hears_leaves_every_row_exactly_once(
    db: psycopg.Connection[Any], database_url: str, proxy: PgProxy, fault: CommitFault
) -> None:
    """The first COMMIT's connection drops (after Postgres committed, or before it got the COMMIT) or its answer
    never comes (the write times out): the writer retries, and the table holds every row once."""
    _dets, _deer, rows = logged_rows(db, detections=20, profiles=5)
    dsn = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert dsn != database_url
    proxy.break_next_commit(fault)
    buffer = ScoreBuffer(dsn, limits=BufferLimits(flush_rows=50, flush_interval_s=0.05, write_timeout_s=1.0, writers=2))

    async def scenario() -> None:
        buffer.start()
        buffer.add(rows)
        await wait_until_async(lambda: proxy.commit_faults_done == 1, what="the broken commit")
        await wait_until_async(lambda: buffer.pending == 0, what="every row written")
        await buffer.close()

    asyncio.run(scenario())
    assert score_counts(db) == {"n": 100, "pairs": 100}
    assert (buffer.stats.written, buffer.stats.dropped, buffer.pending) == (100, 0, 0)
    assert buffer.stats.failed_flushes == 1


def test_a_row_postgres_refuses_is_dropped_alone_and_the_rest_of_its_chunk_lands(
    db: psycopg.Connection[Any], database_url: str
) -> None:
    """A NaN similarity breaks the table's range check: that one row is counted as refused, 99 land."""
    _dets, _deer, rows = logged_rows(db, detections=20, profiles=5)
    bad = rows[37]
    rows[37] = ScoreRow(**{**{f: getattr(bad, f) for f in bad.__dataclass_fields__}, "similarity": float("nan")})
    buffer = ScoreBuffer(database_url, limits=BufferLimits(flush_rows=5_000))
    buffer.add(rows)

    async def scenario() -> None:
        buffer.start()
        await wait_until_async(lambda: buffer.pending == 0, what="every row written or dropped")
        await buffer.close()

    asyncio.run(scenario())
    assert score_counts(db) == {"n": 99, "pairs": 99}
    assert (buffer.stats.written, buffer.stats.dropped_by_reason) == (99, {"refused": 1})
    assert db.execute(
        "SELECT count(*) AS n FROM reid_similarity_scores WHERE detection_id = %s AND deer_id = %s",
        (bad.detection_id, bad.deer_id),
    ).fetchone() == {"n": 0}


def test_chunk_ids_past_their_retention_are_pruned_and_recent_ones_kept(
    db: psycopg.Connection[Any], database_url: str
) -> None:
    """The ids that make retries safe have a bounded life: a writer forgets those older than the retention."""
    _dets, _deer, rows = logged_rows(db, detections=2, profiles=5)
    db.execute(
        "INSERT INTO score_log_chunks (id, rows, written_at) VALUES"
        " (gen_random_uuid(), 5, now() - interval '2 hours'), (gen_random_uuid(), 5, now() - interval '10 minutes')"
    )
    buffer = ScoreBuffer(database_url, limits=BufferLimits(chunk_id_retention_s=3_600))
    buffer.add(rows)

    async def scenario() -> int:
        written = await buffer.flush_once()
        await buffer.close()
        return written

    assert asyncio.run(scenario()) == 10
    kept = db.execute(
        "SELECT rows, written_at > now() - interval '1 hour' AS recent FROM score_log_chunks ORDER BY written_at"
    ).fetchall()
    assert kept == [{"rows": 5, "recent": True}, {"rows": 10, "recent": True}]


def test_a_chunk_whose_commit_stays_unknown_past_the_retention_is_counted_not_written_again(
    db: psycopg.Connection[Any], database_url: str, proxy: PgProxy
) -> None:
    """Once its id may have been pruned, a retry could no longer tell: the chunk is dropped and counted instead."""
    _dets, _deer, rows = logged_rows(db, detections=10, profiles=5)
    dsn = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    proxy.break_next_commit("lost_after")
    buffer = ScoreBuffer(dsn, limits=BufferLimits(chunk_id_retention_s=1e-6))
    buffer.add(rows)

    async def scenario() -> list[int]:
        results = [await buffer.flush_once(), await buffer.flush_once()]
        await buffer.close()
        return results

    assert asyncio.run(scenario()) == [0, 0]
    assert proxy.commit_faults_done == 1
    assert score_counts(db) == {"n": 50, "pairs": 50}  # the lost COMMIT did land
    assert (buffer.stats.written, buffer.stats.dropped_by_reason, buffer.pending) == (0, {"outcome_unknown": 50}, 0)
