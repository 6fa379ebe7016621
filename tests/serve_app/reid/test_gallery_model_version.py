"""A gallery refresh under a new model records which model made each embedding, never who made a decision.

Both gallery loaders (the online Identifier's and the backfill's) embed an automatic decision made by an
earlier model: the decision keeps its model version (and so the Camtrap DP export's classifiedBy), the
embedding is recorded as the new model's.
"""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from PIL import Image

from batch.galleries import load_site_gallery
from batch.results import Scored
from batch.score_writer import write_block
from serve_app.exports.camtrap import write_package
from serve_app.reid.decision import Thresholds
from serve_app.reid.embedder import Embedder, ModelSpec, embedding_to_bytes
from serve_app.reid.gallery import Gallery
from serve_app.reid.identifier import Identifier, IdentifierOptions
from serve_app.reid.score_buffer import ScoreBuffer
from serve_app.store.db import connect, make_pool
from tests import factories

MODEL_B = ModelSpec(architecture="resnet18", weights="random", seed=7, input_size_px=64)
MODEL_A = "resnet18-earlier-model"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(MODEL_B)


def _online_loader(database_url: str, site: int, embedder: Embedder, root: Path) -> Gallery:
    async def refresh() -> Gallery:
        pool = make_pool(database_url, max_size=2)
        await pool.open()
        try:
            identifier = Identifier(
                embedder, pool=pool, scores=ScoreBuffer(database_url), options=IdentifierOptions(image_root=root)
            )
            return (await identifier.galleries_for({site}))[site]
        finally:
            await pool.close()

    return asyncio.run(refresh())


def _backfill_loader(database_url: str, site: int, embedder: Embedder, root: Path) -> Gallery:
    with connect(database_url) as conn:
        return load_site_gallery(conn, site, embedder=embedder, image_root=root, store=True)[0]


LOADERS: dict[str, Callable[[str, int, Embedder, Path], Gallery]] = {
    "online": _online_loader,
    "backfill": _backfill_loader,
}


def _classified_by(database_url: str, site: int) -> dict[str, str]:
    params = {"start_date": "2000-01-01", "end_date": "2100-01-01", "group_by": "day", "site_ids": [site]}
    sink = io.BytesIO()
    with connect(database_url) as conn:
        write_package(conn, sink, job_id=str(uuid.uuid4()), params=params, scientific_name="x", check=lambda: None)
    with zipfile.ZipFile(sink) as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("observations.csv").decode())))
    return {r["observationID"]: r["classifiedBy"] for r in rows}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_gallery_refresh_keeps_the_decisions_model_and_records_the_embeddings(
    loader: str, database_url: str, db: psycopg.Connection[Any], embedder: Embedder, tmp_path: Path
) -> None:
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    site = factories.site(db)
    buck = factories.deer(db, site_id=site, name="buck")
    image = factories.image(db, camera_id=factories.camera(db, site_id=site), uri="a.jpg")
    auto = factories.detection(db, image_id=image, deer_id=buck, decision="auto", top1_similarity=0.8)
    manual = factories.detection(db, image_id=image, deer_id=buck)
    earlier = embedding_to_bytes(np.full(16, 0.25, dtype=np.float32))  # model A's vector, of A's own size
    db.execute("UPDATE detections SET embedding = %s, model_version = %s WHERE id = %s", (earlier, MODEL_A, auto))

    LOADERS[loader](database_url, site, embedder, tmp_path)

    rows = {
        r["id"]: r
        for r in db.execute(
            "SELECT id, model_version, embedding_model_version, length(embedding) AS size FROM detections"
        )
    }
    assert rows[auto]["model_version"] == MODEL_A  # who decided stays who decided
    assert rows[manual]["model_version"] is None  # a person decided this one
    for det in (auto, manual):
        assert rows[det]["embedding_model_version"] == embedder.model_version
        assert rows[det]["size"] == 4 * embedder.embedding_dim
    assert _classified_by(database_url, site) == {str(auto): f"trailcam-reid {MODEL_A}", str(manual): ""}
    # The stored embeddings are the new model's: with the image gone, the next refresh still has both.
    before = db.execute("SELECT id, embedding FROM detections ORDER BY id").fetchall()
    (tmp_path / "a.jpg").unlink()
    again = LOADERS[loader](database_url, site, embedder, tmp_path)
    assert again.deer_ids == [buck] and again.embeddings.shape == (2, embedder.embedding_dim)
    assert db.execute("SELECT id, embedding FROM detections ORDER BY id").fetchall() == before


def run_block(db: psycopg.Connection[Any], results: list[Scored], *, store_embeddings: bool, assign: bool) -> None:
    """What one backfill block of model "model-b" commits for these results."""
    with psycopg.connect(db.info.dsn) as conn:
        write_block(
            conn,
            results,
            run_id=uuid.uuid4(),
            model_version="model-b",
            thresholds=Thresholds(),
            store_embeddings=store_embeddings,
            assign=assign,
        )


@pytest.mark.parametrize("assign", [False, True], ids=["embeddings-only", "apply-assignments"])
def test_a_backfill_storing_embeddings_changes_a_decisions_model_only_when_it_decides_again(
    assign: bool, db: psycopg.Connection[Any]
) -> None:
    site = factories.site(db)
    buck = factories.deer(db, site_id=site, name="buck")
    camera = factories.camera(db, site_id=site)
    auto, manual = (
        factories.detection(db, image_id=factories.image(db, camera_id=camera), deer_id=buck, decision=decision)
        for decision in ("auto", "manual")
    )
    db.execute("UPDATE detections SET model_version = %s WHERE id = %s", (MODEL_A, auto))
    vector = embedding_to_bytes(np.full(8, 0.5, dtype=np.float32))
    results = [Scored(det, site, [buck], np.array([0.9], dtype=np.float32), embedding=vector) for det in (auto, manual)]
    run_block(db, results, store_embeddings=True, assign=assign)
    rows = {r["id"]: r for r in db.execute("SELECT id, model_version, embedding_model_version FROM detections")}
    # Re-deciding makes the run's model the decision's; storing an embedding alone does not.
    assert rows[auto]["model_version"] == ("model-b" if assign else MODEL_A)
    assert rows[manual]["model_version"] is None
    assert {r["embedding_model_version"] for r in rows.values()} == {"model-b"}


def test_a_re_decision_without_new_embeddings_keeps_naming_the_model_that_made_the_stored_one(
    db: psycopg.Connection[Any],
) -> None:
    site = factories.site(db)
    buck = factories.deer(db, site_id=site, name="buck")
    camera = factories.camera(db, site_id=site)
    auto = factories.detection(db, image_id=factories.image(db, camera_id=camera), deer_id=buck, decision="auto")
    old_vector = embedding_to_bytes(np.full(8, 0.25, dtype=np.float32))
    db.execute("UPDATE detections SET model_version = %s, embedding = %s WHERE id = %s", (MODEL_A, old_vector, auto))
    results = [Scored(auto, site, [buck], np.array([0.2], dtype=np.float32))]
    run_block(db, results, store_embeddings=False, assign=True)
    row = db.execute(
        "SELECT model_version, embedding_model_version, embedding, decision FROM detections WHERE id = %s", (auto,)
    ).fetchone()
    assert row["decision"] == "unassigned" and row["model_version"] == "model-b"  # model B decided again
    # The stored vector is still model A's: a gallery of model B must not take it for one of its own.
    assert bytes(row["embedding"]) == old_vector and row["embedding_model_version"] == MODEL_A
