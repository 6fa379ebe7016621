"""What a gallery holds and what must be embedded, decided from the rows the store reads (no I/O here)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from serve_app.reid.embedder import embedding_from_bytes, embedding_to_bytes
from serve_app.reid.gallery import Gallery, GalleryRow, build_gallery, embed_rows, fill_gallery, gallery_contents
from serve_app.reid.preprocessing import BBox

MODEL = "resnet18-random-seed7-64"


def record(deer_id: int, det: int, *, vector: list[float] | None = None, made_by: str | None = MODEL) -> dict[str, Any]:
    """A row as GALLERY_SQL returns it."""
    blob = embedding_to_bytes(np.asarray(vector, dtype=np.float32)) if vector is not None else None
    return {
        "deer_id": deer_id, "name": f"deer {deer_id}", "detection_id": det, "embedding": blob,
        "embedding_model_version": made_by if vector is not None else None, "uri": f"{det}.jpg",
        "bbox_x": 0.1, "bbox_y": 0.2, "bbox_w": 0.3, "bbox_h": 0.4,
    }  # fmt: skip


def ids(rows: tuple[GalleryRow, ...]) -> list[int]:
    return [r.detection_id for r in rows]


def test_cached_embeddings_of_the_model_are_held_and_the_rest_is_to_embed() -> None:
    records = [
        record(1, 11, vector=[1, 0]),
        record(1, 12),  # never embedded
        record(2, 21, vector=[0, 1], made_by="an-earlier-model"),  # cached, but not this model's
        record(2, 22, vector=[0.6, 0.8]),
    ]
    contents = gallery_contents(records, model_version=MODEL)
    assert ids(contents.held) == [11, 22]
    assert ids(contents.to_embed) == [12, 21]
    assert contents.fresh == () and contents.fresh_embeddings() == {}
    assert all(r.embedding is None for r in contents.to_embed)
    assert np.array_equal(contents.held[1].embedding, np.asarray([0.6, 0.8], dtype=np.float32))
    assert contents.held[0].bbox == BBox(0.1, 0.2, 0.3, 0.4) and contents.held[0].uri == "11.jpg"


def test_vectors_made_now_join_the_gallery_in_row_order_and_are_the_ones_to_store() -> None:
    records = [record(1, 11, vector=[1, 0]), record(1, 12), record(2, 21), record(2, 22, vector=[0, 1])]
    made = {12: np.asarray([0.0, 1.0], dtype=np.float32)}  # 21's image could not be read
    contents = gallery_contents(records, model_version=MODEL, embedded=made)
    assert ids(contents.held) == [11, 12, 22]  # gallery order kept; the unreadable one is left out
    assert ids(contents.to_embed) == [21]
    assert ids(contents.fresh) == [12]
    stored = contents.fresh_embeddings()
    assert list(stored) == [12] and np.array_equal(embedding_from_bytes(stored[12]), made[12])


def test_a_vector_made_now_never_replaces_the_models_own_cached_one() -> None:
    contents = gallery_contents(
        [record(1, 11, vector=[1, 0])], model_version=MODEL, embedded={11: np.asarray([0, 1], dtype=np.float32)}
    )
    assert ids(contents.held) == [11] and contents.fresh == ()
    assert np.array_equal(contents.held[0].embedding, np.asarray([1, 0], dtype=np.float32))


def test_no_rows_make_an_empty_gallery() -> None:
    contents = gallery_contents([], model_version=MODEL)
    assert contents.held == contents.to_embed == contents.fresh == ()
    gallery: Gallery = build_gallery(5, rows=contents.held, model_version=MODEL)
    assert gallery.size == 0 and gallery.score(np.ones((1, 2), dtype=np.float32)).shape == (1, 0)


def test_the_held_rows_build_one_column_per_profile() -> None:
    records = [record(2, 21, vector=[1, 0]), record(2, 22, vector=[0, 1]), record(1, 11, vector=[0.6, 0.8])]
    gallery = build_gallery(5, rows=gallery_contents(records, model_version=MODEL).held, model_version=MODEL)
    assert gallery.deer_ids == [2, 1] and gallery.names == ["deer 2", "deer 1"]
    assert np.allclose(gallery.score(np.asarray([[0.0, 1.0]], dtype=np.float32)), [[1.0, 0.8]])


def test_fill_gallery_embeds_only_the_missing_rows_and_leaves_out_unreadable_ones() -> None:
    records = [record(1, 11, vector=[1, 0]), record(1, 12), record(2, 21), record(2, 22)]
    frame = Image.new("RGB", (4000, 3000), (90, 120, 30))
    loaded: list[int] = []
    batches: list[list[tuple[int, int]]] = []

    def load(row: GalleryRow) -> Image.Image:
        if row.detection_id == 21:
            raise OSError("gone")
        loaded.append(row.detection_id)
        return frame

    def embed(crops: list[Image.Image]) -> np.ndarray:
        batches.append([c.size for c in crops])
        return np.tile(np.asarray([0.0, 1.0], dtype=np.float32), (len(crops), 1))

    contents = fill_gallery(records, model_version=MODEL, load=load, embed=embed, unreadable=(OSError,))
    assert loaded == [12, 22]  # the cached row is not read again
    assert batches == [[(448, 448), (448, 448)]]  # crops are capped at CROP_MAX_SIDE_PX on this path too
    assert ids(contents.held) == [11, 12, 22] and ids(contents.fresh) == [12, 22] and ids(contents.to_embed) == [21]


def test_embed_rows_runs_the_model_chunk_by_chunk_and_other_errors_propagate() -> None:
    rows = gallery_contents([record(1, d) for d in range(5)], model_version=MODEL).to_embed
    sizes: list[int] = []

    def embed(crops: list[Image.Image]) -> np.ndarray:
        sizes.append(len(crops))
        return np.zeros((len(crops), 2), dtype=np.float32)

    vectors = embed_rows(rows, load=lambda r: Image.new("RGB", (64, 64)), embed=embed, unreadable=(OSError,), chunk=2)
    assert sizes == [2, 2, 1] and sorted(vectors) == [0, 1, 2, 3, 4]

    def broken(row: GalleryRow) -> Image.Image:
        raise RuntimeError("a bug, not an unreadable image")

    with pytest.raises(RuntimeError):
        embed_rows(rows, load=broken, embed=embed, unreadable=(OSError,))
