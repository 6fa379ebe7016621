"""The binary COPY encoder writes exactly the rows it is given (types, NULLs, time zones)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest

from serve_app.reid.scores import ScoreRow, copy_scores
from tests import factories


def test_rows_read_back_equal_the_rows_written(db: psycopg.Connection[Any]) -> None:
    site = factories.site(db)
    det = factories.detection(db, image_id=factories.image(db, camera_id=factories.camera(db, site_id=site)))
    deer = [factories.deer(db, site_id=site) for _ in range(3)]
    run = uuid.uuid4()
    when = dt.datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=dt.UTC)
    rows = [
        ScoreRow(det, deer[0], 0.875, 1, 0.55, True, "resnet18-random-seed7-64", "online", None, when),
        ScoreRow(det, deer[1], -0.25, 2, 0.55, False, "resnet18-random-seed7-64", "backfill", run, when),
        ScoreRow(det, deer[2], 0.0, 3, 0.6, False, "mod-é", "backfill", run, when + dt.timedelta(days=400)),
    ]
    with psycopg.connect(db.info.dsn) as conn:
        assert copy_scores(conn, rows) == 3
        conn.commit()
    stored = db.execute(
        "SELECT detection_id, deer_id, similarity, rank, threshold, matched, model_version, source, run_id,"
        " computed_at FROM reid_similarity_scores ORDER BY rank"
    ).fetchall()
    for row, got in zip(rows, stored, strict=True):
        assert (got["detection_id"], got["deer_id"], got["rank"], got["matched"]) == (
            row.detection_id,
            row.deer_id,
            row.rank,
            row.matched,
        )
        assert got["similarity"] == pytest.approx(row.similarity, abs=1e-7)
        assert got["threshold"] == pytest.approx(row.threshold, abs=1e-7)
        assert (got["model_version"], got["source"], got["run_id"]) == (row.model_version, row.source, row.run_id)
        assert got["computed_at"] == row.computed_at


def test_an_empty_batch_writes_nothing(db: psycopg.Connection[Any]) -> None:
    with psycopg.connect(db.info.dsn) as conn:
        assert copy_scores(conn, []) == 0
    assert db.execute("SELECT count(*) AS n FROM reid_similarity_scores").fetchone()["n"] == 0
