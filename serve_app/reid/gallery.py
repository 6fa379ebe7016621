"""Per-site galleries: every profile's gallery embeddings as one matrix; a profile scores its max cosine.

Plain Python. :func:`gallery_contents` alone decides what a gallery holds and what must be embedded, from
the rows :mod:`serve_app.store.galleries` reads; :func:`fill_gallery` embeds what is missing. The online
path (``Identifier``) and the backfill (``batch.galleries``) are thin wrappers that read, fill, store, build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from serve_app.reid.embedder import embedding_from_bytes, embedding_to_bytes
from serve_app.reid.preprocessing import BBox, crop
from serve_app.store.db import Row

logger = logging.getLogger(__name__)

DEFAULT_CAP_PER_DEER = 20
"""Gallery detections kept per deer profile (newest first)."""

EMBED_CHUNK = 32
"""Gallery crops per forward pass when embedding missing gallery detections."""


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
    def from_record(cls, record: Row, *, model_version: str) -> GalleryRow:
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
    )


@dataclass(frozen=True)
class GalleryContents:
    """What a site's gallery holds for one model version, and what it still lacks."""

    held: tuple[GalleryRow, ...]
    """Rows with an embedding of the model version (cached or fresh), in gallery order: the gallery."""
    to_embed: tuple[GalleryRow, ...]
    """Rows without one: to be embedded from their crops (left out of the gallery until they are)."""
    fresh: tuple[GalleryRow, ...]
    """Held rows whose embedding was made now, not read: to be stored as the model version's."""

    def fresh_embeddings(self) -> dict[int, bytes]:
        """The fresh embeddings in stored form, by detection id."""
        return {r.detection_id: embedding_to_bytes(r.embedding) for r in self.fresh if r.embedding is not None}


def gallery_contents(
    records: Sequence[Row], *, model_version: str, embedded: Mapping[int, np.ndarray] | None = None
) -> GalleryContents:
    """Decide a gallery from its rows (already site-scoped, merged profiles followed and capped by the store).

    A stored embedding counts only when ``model_version`` made it; a row without one takes its vector from
    ``embedded`` (detection id -> vector made now) or, lacking that too, is to be embedded and left out.
    """
    held: list[GalleryRow] = []
    to_embed: list[GalleryRow] = []
    fresh: list[GalleryRow] = []
    for record in records:
        row = GalleryRow.from_record(record, model_version=model_version)
        if row.embedding is None and embedded is not None and row.detection_id in embedded:
            row = GalleryRow(row.deer_id, row.name, row.detection_id, row.uri, row.bbox, embedded[row.detection_id])
            fresh.append(row)
        (to_embed if row.embedding is None else held).append(row)
    return GalleryContents(tuple(held), tuple(to_embed), tuple(fresh))


LoadImage = Callable[[GalleryRow], Image.Image]
"""Reads a gallery row's decoded frame; raises one of the caller's ``unreadable`` errors when it cannot."""
EmbedCrops = Callable[[list[Image.Image]], np.ndarray]
"""Embeds crops into unit vectors [N, D]."""


def embed_rows(
    rows: Sequence[GalleryRow],
    *,
    load: LoadImage,
    embed: EmbedCrops,
    unreadable: tuple[type[Exception], ...],
    chunk: int = EMBED_CHUNK,
) -> dict[int, np.ndarray]:
    """Vectors by detection id from the rows' capped crops; a row whose image cannot be read is left out."""
    vectors: dict[int, np.ndarray] = {}
    for start in range(0, len(rows), chunk):
        ids: list[int] = []
        crops: list[Image.Image] = []
        for row in rows[start : start + chunk]:
            try:
                crops.append(crop(load(row), row.bbox))  # capped at CROP_MAX_SIDE_PX like every path's crops
            except unreadable as exc:
                logger.warning("gallery detection %d left out: %s", row.detection_id, exc)
                continue
            ids.append(row.detection_id)
        if crops:
            vectors.update(zip(ids, embed(crops), strict=True))
    return vectors


def fill_gallery(
    records: Sequence[Row],
    *,
    model_version: str,
    load: LoadImage,
    embed: EmbedCrops,
    unreadable: tuple[type[Exception], ...],
) -> GalleryContents:
    """:func:`gallery_contents` with the missing embeddings made (blocking: model work; run it off the event loop)."""
    contents = gallery_contents(records, model_version=model_version)
    if not contents.to_embed:
        return contents
    embedded = embed_rows(contents.to_embed, load=load, embed=embed, unreadable=unreadable)
    return gallery_contents(records, model_version=model_version, embedded=embedded)
