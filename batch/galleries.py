"""Site galleries for the backfill: the online path's SQL and matrix, with an optional no-write mode.

Gallery detections lacking an embedding for the model version are embedded from their exact
(full-decode) crops, like the online path does, and stored unless the run is a dry run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from batch.crops import UnreadableImage, image_path, open_frame
from serve_app.reid.embedder import Embedder
from serve_app.reid.gallery import (
    DEFAULT_CAP_PER_DEER,
    GALLERY_SQL,
    STORE_EMBEDDINGS_SQL,
    VERSIONS_SQL,
    Gallery,
    GalleryRow,
    build_gallery,
    fill_embeddings,
    store_params,
)
from serve_app.reid.preprocessing import crop

logger = logging.getLogger(__name__)

EMBED_CHUNK = 32


def embed_gallery_rows(rows: Sequence[GalleryRow], *, embedder: Embedder, image_root: Path) -> list[GalleryRow]:
    """Rows with embeddings from their full-frame crops; rows whose image cannot be read are left out."""
    loaded: list[GalleryRow] = []
    vectors: list[np.ndarray] = []
    for start in range(0, len(rows), EMBED_CHUNK):
        chunk, crops = [], []
        for row in rows[start : start + EMBED_CHUNK]:
            try:
                crops.append(crop(open_frame(image_path(row.uri, root=image_root)), row.bbox))
            except UnreadableImage as exc:
                logger.warning("gallery detection %d left out: %s", row.detection_id, exc)
                continue
            chunk.append(row)
        if chunk:
            loaded.extend(chunk)
            vectors.append(embedder.embed_crops(crops))
    return fill_embeddings(loaded, np.concatenate(vectors)) if loaded else []


def load_site_gallery(
    conn: psycopg.Connection[Any],
    site_id: int,
    *,
    embedder: Embedder,
    image_root: Path,
    store: bool,
    cap_per_deer: int = DEFAULT_CAP_PER_DEER,
) -> tuple[Gallery, int]:
    """A site's gallery on the embedder's device and the number of gallery detections it had to embed."""
    version = embedder.model_version
    cur = conn.cursor(row_factory=dict_row)
    version_row = cur.execute(VERSIONS_SQL, ([site_id],)).fetchone()
    records = cur.execute(GALLERY_SQL, {"site_id": site_id, "cap": cap_per_deer}).fetchall()
    rows = [GalleryRow.from_record(dict(r), model_version=version) for r in records]
    missing = [r for r in rows if r.embedding is None]
    filled: list[GalleryRow] = []
    if missing:
        filled = embed_gallery_rows(missing, embedder=embedder, image_root=image_root)
        if store and filled:
            cur.execute(STORE_EMBEDDINGS_SQL, store_params(filled, model_version=version))
        done = {r.detection_id: r for r in filled}
        rows = [done.get(r.detection_id, r) for r in rows if r.embedding is not None or r.detection_id in done]
    conn.commit()
    gallery = build_gallery(
        site_id,
        rows=rows,
        model_version=version,
        version=int(version_row["version"]) if version_row else 0,
        device=str(embedder.device),
    )
    return gallery, len(filled)


def load_galleries(
    dsn: str, site_ids: Iterable[int], *, embedder: Embedder, image_root: Path, store: bool
) -> dict[int, Gallery]:
    """Galleries of several sites, read on one connection."""
    galleries: dict[int, Gallery] = {}
    with psycopg.connect(dsn) as conn:
        for site_id in site_ids:
            galleries[site_id], embedded = load_site_gallery(
                conn, site_id, embedder=embedder, image_root=image_root, store=store
            )
            if embedded:
                logger.info("embedded %d gallery detections of site %d", embedded, site_id)
    return galleries
