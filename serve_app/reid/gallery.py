"""Per-site galleries: every profile's gallery embeddings as one matrix; a profile scores its max cosine.

Plain Python. The SQL lives here once; :func:`load_gallery` is the synchronous loader for batch jobs,
the Serve deployment runs the same statements on an async connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
import torch

from serve_app.reid.embedder import embedding_from_bytes, embedding_to_bytes
from serve_app.reid.preprocessing import BBox

logger = logging.getLogger(__name__)

DEFAULT_CAP_PER_DEER = 20
"""Gallery detections kept per deer profile (newest first)."""

# The model that made a stored embedding: the gallery refresh records it in embedding_model_version; NULL
# means the decision's model, which the online path stores together with the embedding.
GALLERY_SQL = """
SELECT deer.id AS deer_id, deer.name, d.id AS detection_id, d.embedding,
       coalesce(d.embedding_model_version, d.model_version) AS embedding_model_version,
       i.uri, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h
FROM deer
JOIN LATERAL (
    SELECT * FROM detections d WHERE d.deer_id = deer.id ORDER BY d.created_at DESC, d.id DESC LIMIT %(cap)s
) d ON true
JOIN images i ON i.id = d.image_id
WHERE deer.site_id = %(site_id)s AND deer.merged_into IS NULL
ORDER BY deer.id, d.created_at DESC, d.id DESC
"""

VERSIONS_SQL = "SELECT site_id, version FROM gallery_versions WHERE site_id = ANY(%s)"

# model_version stays the model that made the detection's decision (Camtrap DP classifiedBy, the scores the
# review queue shows); only the embedding's model changes.
STORE_EMBEDDINGS_SQL = """
UPDATE detections AS d SET embedding = u.embedding, embedding_model_version = %s
FROM unnest(%s::bigint[], %s::bytea[]) AS u(id, embedding) WHERE d.id = u.id
"""


@dataclass(frozen=True, slots=True)
class GalleryRow:
    """One gallery detection as read from Postgres."""

    deer_id: int
    name: str
    detection_id: int
    uri: str
    bbox: BBox
    embedding: np.ndarray | None

    @classmethod
    def from_record(cls, record: dict[str, Any], *, model_version: str) -> GalleryRow:
        """A row from a dict record; the embedding is kept only when it was made by ``model_version``."""
        raw = record["embedding"]
        usable = raw is not None and record["embedding_model_version"] == model_version
        return cls(
            deer_id=int(record["deer_id"]),
            name=str(record["name"]),
            detection_id=int(record["detection_id"]),
            uri=str(record["uri"]),
            bbox=BBox(record["bbox_x"], record["bbox_y"], record["bbox_w"], record["bbox_h"]),
            embedding=embedding_from_bytes(bytes(raw)) if usable else None,
        )


@dataclass
class Gallery:
    """The profiles of one site and their gallery embeddings, on the scoring device."""

    site_id: int
    model_version: str
    version: int
    deer_ids: list[int]
    names: list[str]
    embeddings: torch.Tensor  # [M, D], rows grouped by profile
    owner: torch.Tensor  # [M] int64, index into deer_ids
    names_by_id: dict[int, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of profiles (K)."""
        return len(self.deer_ids)

    def score(self, queries: np.ndarray) -> np.ndarray:
        """Similarities [N, K]: for each query, the max cosine over each profile's embeddings."""
        n = queries.shape[0]
        if self.size == 0:
            return np.zeros((n, 0), dtype=np.float32)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.embeddings.device)
        sims = q @ self.embeddings.T
        out = torch.full((n, self.size), -2.0, device=sims.device)
        out.scatter_reduce_(1, self.owner.expand(n, -1), sims, reduce="amax", include_self=True)
        result: np.ndarray = np.clip(out.cpu().numpy(), -1.0, 1.0)
        return result


def build_gallery(
    site_id: int, *, rows: Sequence[GalleryRow], model_version: str, version: int = 0, device: str = "cpu"
) -> Gallery:
    """A gallery from rows whose embeddings are all present; profiles keep their first-seen order."""
    deer_ids: list[int] = []
    names: list[str] = []
    index: dict[int, int] = {}
    vectors: list[np.ndarray] = []
    owner: list[int] = []
    for row in rows:
        if row.embedding is None:
            raise ValueError(f"gallery detection {row.detection_id} has no embedding for {model_version}")
        if row.deer_id not in index:
            index[row.deer_id] = len(deer_ids)
            deer_ids.append(row.deer_id)
            names.append(row.name)
        vectors.append(row.embedding)
        owner.append(index[row.deer_id])
    dim = vectors[0].shape[0] if vectors else 1
    matrix = np.stack(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
    return Gallery(
        site_id=site_id,
        model_version=model_version,
        version=version,
        deer_ids=deer_ids,
        names=names,
        embeddings=torch.from_numpy(matrix).to(device),
        owner=torch.tensor(owner, dtype=torch.int64, device=device),
        names_by_id=dict(zip(deer_ids, names, strict=True)),
    )


def fill_embeddings(rows: Sequence[GalleryRow], vectors: np.ndarray) -> list[GalleryRow]:
    """Rows with the given vectors set on those that lacked one (in order)."""
    it = iter(vectors)
    out = []
    for row in rows:
        if row.embedding is None:
            row = GalleryRow(row.deer_id, row.name, row.detection_id, row.uri, row.bbox, next(it))
        out.append(row)
    return out


def store_params(rows: Sequence[GalleryRow], *, model_version: str) -> tuple[str, list[int], list[bytes]]:
    """Parameters for :data:`STORE_EMBEDDINGS_SQL`."""
    ids = [r.detection_id for r in rows if r.embedding is not None]
    blobs = [embedding_to_bytes(r.embedding) for r in rows if r.embedding is not None]
    return model_version, ids, blobs


EmbedMissing = Callable[[Sequence[GalleryRow]], np.ndarray]
"""Embeds gallery rows lacking an embedding (loads their image, crops, runs the model)."""


def load_gallery(
    conn: psycopg.Connection[Any],
    site_id: int,
    *,
    model_version: str,
    embed_missing: EmbedMissing,
    cap_per_deer: int = DEFAULT_CAP_PER_DEER,
    device: str = "cpu",
) -> Gallery:
    """Read a site's gallery (sync), embedding and storing the detections that lack a current embedding."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    version_row = cur.execute(VERSIONS_SQL, ([site_id],)).fetchone()
    records = cur.execute(GALLERY_SQL, {"site_id": site_id, "cap": cap_per_deer}).fetchall()
    rows = [GalleryRow.from_record(r, model_version=model_version) for r in records]
    missing = [r for r in rows if r.embedding is None]
    if missing:
        filled = fill_embeddings(missing, embed_missing(missing))
        cur.execute(STORE_EMBEDDINGS_SQL, store_params(filled, model_version=model_version))
        conn.commit()
        rows = fill_embeddings(rows, np.stack([r.embedding for r in filled if r.embedding is not None]))
        logger.info("embedded %d gallery detections of site %d", len(missing), site_id)
    version = int(version_row["version"]) if version_row else 0
    return build_gallery(site_id, rows=rows, model_version=model_version, version=version, device=device)
