"""The backfill's device path: Ray sees the GPU, the embedding actor takes it and embeds there in bfloat16, and
``--decode gpu`` (nvJPEG, crops cut on the GPU) scores what CPU decoding scores, within bfloat16's tolerance."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
import pytest
import torch
from PIL import Image

from batch import pipeline
from batch.backfill import run_backfill
from batch.crops import image_path, load_crop
from batch.runs import BackfillOptions
from serve_app.reid.embedder import Embedder, ModelSpec, embedding_from_bytes
from serve_app.reid.preprocessing import BBox
from tests.batch.conftest import Demo
from tests.gpu.tolerance import MAX_SIMILARITY_SHIFT, MIN_COSINE

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("ray_session")]

SERVED = {"architecture": "mobilenet_v2", "weights": "imagenet", "input_size_px": 128, "batch_size": 16}


def stored(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every detection with its stored embedding, image and bbox, by id."""
    return conn.execute(
        "SELECT d.id, d.embedding, i.uri, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h FROM detections d"
        " JOIN images i ON i.id = d.image_id WHERE d.embedding IS NOT NULL ORDER BY d.id"
    ).fetchall()


def top1(conn: psycopg.Connection[Any], run_id: Any) -> dict[int, float]:
    """detection id -> its top-1 similarity in a run."""
    rows = conn.execute(
        "SELECT detection_id, similarity FROM reid_similarity_scores WHERE run_id = %s AND rank = 1", (run_id,)
    )
    return {r["detection_id"]: r["similarity"] for r in rows}


def test_the_embedding_actor_takes_the_gpu_and_embeds_there(demo: Demo, fresh: psycopg.Connection[Any]) -> None:
    assert pipeline.gpu_count() >= 1, "Ray found no GPU on this CUDA machine"
    options = BackfillOptions(**SERVED, mode="all", store_embeddings=True)
    result = run_backfill(options, settings=demo.settings)
    total = fresh.execute("SELECT count(*) AS n FROM detections").fetchone()["n"]
    assert (result.state, result.detections, result.failed) == ("completed", total, 0)
    rows = stored(fresh)
    assert len(rows) == total
    on_actor = np.stack([embedding_from_bytes(r["embedding"]) for r in rows])
    cpu = Embedder(ModelSpec(**{k: SERVED[k] for k in ("architecture", "weights", "input_size_px")}, device="cpu"))
    crops = [
        Image.fromarray(load_crop(image_path(r["uri"], root=demo.image_root), BBox(r["bbox_x"], r["bbox_y"],
                        r["bbox_w"], r["bbox_h"]), size_px=cpu.input_size_px))
        for r in rows
    ]  # fmt: skip
    on_cpu = cpu.embed_crops(crops)
    assert (on_actor * on_cpu).sum(axis=1).min() >= MIN_COSINE
    # Not the CPU's float32 arithmetic (which the CPU backfill matches to 1e-5): the actor ran bfloat16 on CUDA.
    assert np.abs(on_actor - on_cpu).max() > 1e-4


def test_decoding_on_the_gpu_scores_what_decoding_on_the_cpu_scores(demo: Demo, fresh: psycopg.Connection[Any]) -> None:
    on_cpu = run_backfill(BackfillOptions(**SERVED, mode="all", store_embeddings=True), settings=demo.settings)
    cpu_vectors = {r["id"]: embedding_from_bytes(r["embedding"]) for r in stored(fresh)}
    on_gpu = run_backfill(BackfillOptions(**SERVED, mode="all", decode="gpu", store_embeddings=True),
                          settings=demo.settings)  # fmt: skip
    assert (on_gpu.state, on_gpu.failed, on_gpu.detections) == ("completed", 0, on_cpu.detections)
    assert on_gpu.score_rows == on_cpu.score_rows > 0
    run = fresh.execute("SELECT parameters FROM backfill_runs WHERE id = %s", (on_gpu.run_id,)).fetchone()
    assert run["parameters"]["decode"] == "gpu"
    gpu_vectors = {r["id"]: embedding_from_bytes(r["embedding"]) for r in stored(fresh)}
    assert gpu_vectors.keys() == cpu_vectors.keys()
    cosine = [float(gpu_vectors[i] @ cpu_vectors[i]) for i in cpu_vectors]
    assert min(cosine) >= MIN_COSINE
    cpu_top1, gpu_top1 = top1(fresh, on_cpu.run_id), top1(fresh, on_gpu.run_id)
    assert gpu_top1.keys() == cpu_top1.keys() and cpu_top1
    assert max(abs(gpu_top1[d] - cpu_top1[d]) for d in cpu_top1) <= MAX_SIMILARITY_SHIFT


def test_nvjpeg_decodes_the_demo_frames_on_the_gpu_without_falling_back(demo: Demo) -> None:
    """--decode gpu is only worth having if the frames are decoded by nvJPEG: none is left to PIL's fallback."""
    from batch.device_crops import _decode_jpegs

    paths = sorted(demo.image_root.rglob("*.jpg"))[:16]
    assert paths
    frames = _decode_jpegs([p.read_bytes() for p in paths], device=torch.device("cuda"))
    assert all(f is not None and f.is_cuda and f.dtype == torch.uint8 for f in frames)
    for path, frame in zip(paths, frames, strict=True):
        assert frame is not None
        with Image.open(path) as image:
            assert tuple(frame.shape) == (3, image.height, image.width)
