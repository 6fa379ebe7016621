"""The plain-Python core without a cluster: embedder, gallery matching, decision rule, COPY writer.

The model runs with random seeded weights, so every case here avoids learned features: identical
crops, the same crop twice, shapes, norms and exact arithmetic on known vectors.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from PIL import Image

from batch.galleries import load_site_gallery
from serve_app.reid.decision import Thresholds, decide
from serve_app.reid.embedder import Embedder, ModelSpec, embedding_from_bytes, embedding_to_bytes
from serve_app.reid.gallery import GalleryRow, build_gallery
from serve_app.reid.preprocessing import BBox, crop
from serve_app.reid.score_buffer import BufferLimits, ScoreBuffer
from serve_app.reid.scores import copy_scores, score_rows
from tests import factories
from tests.waiting import wait_until_async

SMALL = ModelSpec(architecture="resnet18", weights="random", seed=7, input_size_px=64)


def noise_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(SMALL)


def test_model_version_names_architecture_random_seed_and_size(embedder: Embedder) -> None:
    assert embedder.model_version == "resnet18-random-seed7-64"
    assert embedder.embedding_dim == 512


def test_same_crop_gives_the_same_unit_embedding(embedder: Embedder) -> None:
    """Identical input -> identical output: independent of learned features."""
    image = noise_image(1)
    bbox = BBox(0.1, 0.2, 0.5, 0.5)
    vectors = embedder.embed_crops([crop(image, bbox), crop(image.copy(), bbox), crop(noise_image(2), bbox)])
    assert vectors.shape == (3, 512)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) >= 0.9999


def test_same_seed_gives_same_model_and_other_seed_differs() -> None:
    image = crop(noise_image(3), BBox(0, 0, 1, 1))
    a = Embedder(SMALL).embed_crops([image])
    b = Embedder(SMALL).embed_crops([image])
    c = Embedder(ModelSpec(architecture="resnet18", seed=8, input_size_px=64))
    assert np.allclose(a, b, atol=1e-6)
    assert c.model_version == "resnet18-random-seed8-64"
    assert not np.allclose(a, c.embed_crops([image]), atol=1e-3)


def test_crop_margin_is_clipped_to_the_frame() -> None:
    image = noise_image(4, (100, 50))
    assert crop(image, BBox(0.0, 0.0, 1.0, 1.0), margin=0.2).size == (100, 50)
    assert crop(image, BBox(0.5, 0.5, 0.2, 0.2), margin=0.0).size == (20, 10)
    with pytest.raises(ValueError):
        BBox(0.9, 0.1, 0.2, 0.2)


def test_embedding_bytes_round_trip() -> None:
    vector = np.arange(8, dtype=np.float32) / 7
    assert np.array_equal(embedding_from_bytes(embedding_to_bytes(vector)), vector)


def _row(deer_id: int, vector: list[float], det: int) -> GalleryRow:
    v = np.asarray(vector, dtype=np.float32)
    return GalleryRow(deer_id, f"d{deer_id}", det, "x.jpg", BBox(0, 0, 1, 1), v / np.linalg.norm(v))


def test_profile_score_is_max_cosine_over_its_embeddings() -> None:
    gallery = build_gallery(
        1, rows=[_row(10, [1, 0, 0], 1), _row(10, [0, 1, 0], 2), _row(20, [0, 0, 1], 3)], model_version="m"
    )
    assert gallery.deer_ids == [10, 20]
    sims = gallery.score(np.asarray([[0.0, 1.0, 0.0], [0.0, 0.6, 0.8]], dtype=np.float32))
    assert np.allclose(sims, [[1.0, 0.0], [0.6, 0.8]], atol=1e-6)


def test_empty_gallery_scores_nothing() -> None:
    gallery = build_gallery(1, rows=[], model_version="m")
    assert gallery.score(np.ones((2, 4), dtype=np.float32)).shape == (2, 0)


def test_decision_rule_bands() -> None:
    plain = Thresholds()
    assert (decide(0.55, plain), decide(0.5499, plain), decide(None, plain)) == ("auto", "unassigned", "unassigned")
    band = Thresholds(accept=0.7, review=0.5)
    assert [decide(s, band) for s in (0.71, 0.7, 0.6, 0.5, 0.49)] == [
        "auto",
        "auto",
        "review",
        "review",
        "unassigned",
    ]
    with pytest.raises(ValueError):
        Thresholds(accept=0.5, review=0.6)


def test_score_rows_rank_best_first_and_mark_the_assigned_profile() -> None:
    rows = score_rows(
        5,
        deer_ids=[1, 2, 3],
        similarities=np.asarray([0.2, 0.9, 0.5]),
        threshold=0.55,
        assigned_deer_id=2,
        model_version="m",
    )
    assert [(r.deer_id, r.rank, r.matched) for r in rows] == [(2, 1, True), (3, 2, False), (1, 3, False)]


def _detection_with_profiles(conn: psycopg.Connection[Any], k: int) -> tuple[int, list[int]]:
    site = factories.site(conn)
    cam = factories.camera(conn, site_id=site)
    det = factories.detection(conn, image_id=factories.image(conn, camera_id=cam))
    return det, [factories.deer(conn, site_id=site) for _ in range(k)]


def test_copy_scores_writes_every_row(db: psycopg.Connection[Any]) -> None:
    det, deer = _detection_with_profiles(db, 3)
    run = uuid.uuid4()
    rows = score_rows(
        det,
        deer_ids=deer,
        similarities=np.asarray([0.1, 0.7, 0.3]),
        threshold=0.55,
        assigned_deer_id=deer[1],
        model_version="m",
        source="backfill",
        run_id=run,
    )
    with db.transaction():
        assert copy_scores(db, rows) == 3
    got = db.execute(
        "SELECT deer_id, rank, matched, source, run_id, round(similarity::numeric, 3) AS s"
        " FROM reid_similarity_scores ORDER BY rank"
    ).fetchall()
    assert [(g["deer_id"], g["rank"], g["matched"], g["source"], g["run_id"]) for g in got] == [
        (deer[1], 1, True, "backfill", run),
        (deer[2], 2, False, "backfill", run),
        (deer[0], 3, False, "backfill", run),
    ]


def test_score_buffer_keeps_rows_while_postgres_is_unreachable_and_counts_overflow(
    db: psycopg.Connection[Any], database_url: str
) -> None:
    """A buffer pointed at a closed port keeps what fits, counts the overflow, and writes after it can connect."""
    from tests.fixtures.ray_cluster import free_port

    det, deer = _detection_with_profiles(db, 2)
    rows = score_rows(
        det, deer_ids=deer, similarities=np.asarray([0.1, 0.2]), threshold=0.5, assigned_deer_id=None, model_version="m"
    )
    dropped: list[tuple[int, str]] = []

    async def scenario() -> tuple[int, int]:
        buffer = ScoreBuffer(
            f"postgresql://postgres@127.0.0.1:{free_port()}/x",
            limits=BufferLimits(max_buffered_rows=5, flush_rows=100, flush_interval_s=0.05),
            on_dropped=lambda n, reason: dropped.append((n, reason)),
        )
        buffer.start()
        for _ in range(4):
            buffer.add(rows)
        assert buffer.pending == 5
        await wait_until_async(lambda: buffer.stats.failed_flushes >= 1, what="a failed flush")
        assert (buffer.pending, buffer.stats.written) == (5, 0)
        buffer.dsn = database_url
        await wait_until_async(lambda: buffer.pending == 0, what="the kept rows written once Postgres is reachable")
        await buffer.close()
        return buffer.stats.written, buffer.stats.dropped

    written, dropped_n = asyncio.run(scenario())
    assert (written, dropped_n, dropped) == (5, 3, [(1, "buffer_full"), (2, "buffer_full")])
    assert db.execute("SELECT count(*) AS n FROM reid_similarity_scores").fetchone() == {"n": 5}


def test_score_buffer_writers_go_on_past_a_stuck_copy_and_close_writes_its_rows(
    db: psycopg.Connection[Any], database_url: str
) -> None:
    """Two writers: while one COPY waits on a locked detection the other writes the rest; closing cancels the
    stuck COPY, puts its rows back, and writes them once the lock is gone: every row exactly once."""
    site = factories.site(db)
    image = factories.image(db, camera_id=factories.camera(db, site_id=site))
    deer = [factories.deer(db, site_id=site) for _ in range(10)]
    dets = [factories.detection(db, image_id=image) for _ in range(20)]
    rows = [
        r
        for d in dets
        for r in score_rows(
            d,
            deer_ids=deer,
            similarities=np.linspace(0.0, 0.9, 10),
            threshold=0.5,
            assigned_deer_id=None,
            model_version="m",
        )
    ]

    async def copies_waiting_on_a_lock(watcher: psycopg.AsyncConnection[Any]) -> set[int]:
        cur = await watcher.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND query LIKE 'COPY%%'"
        )
        return {int(r[0]) for r in await cur.fetchall()}

    async def scenario() -> ScoreBuffer:
        # flush_rows 50 = 5 detections per COPY; the first COPY holds the locked detection.
        buffer = ScoreBuffer(database_url, limits=BufferLimits(flush_rows=50, write_timeout_s=30, writers=2))
        async with (
            await psycopg.AsyncConnection.connect(database_url) as blocker,
            await psycopg.AsyncConnection.connect(database_url, autocommit=True) as watcher,
        ):
            await blocker.execute("SELECT 1 FROM detections WHERE id = %s FOR UPDATE", (dets[0],))
            buffer.start()
            buffer.add(rows)
            await wait_until_async(lambda: buffer.stats.written == 150, what="the unblocked chunks written")
            stuck = await wait_until_async(lambda: copies_waiting_on_a_lock(watcher), what="the COPY on the lock")
            assert len(stuck) == 1 and buffer.pending == 50
            closing = asyncio.create_task(buffer.close(timeout_s=20))

            async def retried_or_closed() -> bool:
                return closing.done() or bool(await copies_waiting_on_a_lock(watcher) - stuck)

            # close() cancels the stuck COPY and writes its rows again: wait for that COPY to block on the lock.
            await wait_until_async(retried_or_closed, what="close() writing the cancelled COPY's rows again")
            assert not closing.done() and buffer.pending == 50
            await blocker.rollback()
            await closing
        return buffer

    buffer = asyncio.run(scenario())
    assert (buffer.stats.written, buffer.stats.dropped, buffer.pending) == (200, 0, 0)
    counts = db.execute(
        "SELECT count(*) AS n, count(DISTINCT (detection_id, deer_id)) AS pairs FROM reid_similarity_scores"
    ).fetchone()
    assert counts == {"n": 200, "pairs": 200}


def test_load_gallery_embeds_and_stores_missing_embeddings(
    db: psycopg.Connection[Any], embedder: Embedder, tmp_path: Path
) -> None:
    site = factories.site(db)
    cam = factories.camera(db, site_id=site)
    buck = factories.deer(db, site_id=site, name="buck")
    dets = []
    for i in range(3):
        noise_image(i).save(tmp_path / f"{i}.jpg")
        dets.append(factories.detection(db, image_id=factories.image(db, camera_id=cam, uri=f"{i}.jpg"), deer_id=buck))

    g, embedded = load_site_gallery(db, site, embedder=embedder, image_root=tmp_path, store=True)
    assert g.deer_ids == [buck] and g.embeddings.shape == (3, 512) and embedded == 3
    assert g.version >= 1  # the assignments bumped the site's gallery version
    again, embedded = load_site_gallery(db, site, embedder=embedder, image_root=tmp_path, store=True)
    assert embedded == 0 and again.embeddings.shape == (3, 512)
    stored = db.execute(
        "SELECT count(*) AS n FROM detections WHERE id = ANY(%s) AND embedding_model_version = %s",
        (dets, embedder.model_version),
    ).fetchone()
    assert stored == {"n": 3}
