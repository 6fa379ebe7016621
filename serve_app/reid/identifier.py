"""Identification of a batch of crops: embed, match against fresh site galleries, decide, store, log scores.

Plain async Python (no Ray): the Serve deployment wraps it, tests can drive it directly. Model and
matrix work runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from serve_app.images import ImageRejected, decode_image, read_limited, resolve_image_uri
from serve_app.reid import identification as q
from serve_app.reid.decision import Thresholds, decide
from serve_app.reid.embedder import Embedder, embedding_to_bytes
from serve_app.reid.gallery import (
    GALLERY_SQL,
    STORE_EMBEDDINGS_SQL,
    VERSIONS_SQL,
    Gallery,
    GalleryRow,
    build_gallery,
    fill_embeddings,
    store_params,
)
from serve_app.reid.identification import Candidate, Identification, IdentifyRequest
from serve_app.reid.preprocessing import crop
from serve_app.reid.score_buffer import ScoreBuffer
from serve_app.reid.scores import ScoreRow, copy_scores_async, score_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdentifierOptions:
    """Gallery and answer tuning."""

    image_root: Path
    cap_per_deer: int = 20
    gallery_refresh_s: float = 1.0
    top_k: int = 5
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    # Score rows go into the detections' own transaction when the log lives in the same database:
    # a replica killed after answering then cannot take unwritten rows with it. The buffer stays the
    # path for a separate score database and for a write that fails (rows retried, never lost silently).
    inline_scores: bool = True


class Identifier:
    """Holds the model, the site galleries (on the model's device) and the score buffer of one process."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        pool: AsyncConnectionPool,
        scores: ScoreBuffer,
        options: IdentifierOptions,
        thresholds: Thresholds | None = None,
        on_identified: Callable[[str, float | None], None] | None = None,
    ) -> None:
        self.embedder = embedder
        self.pool = pool
        self.scores = scores
        self.options = options
        self.thresholds = thresholds or Thresholds()
        self.galleries: dict[int, Gallery] = {}
        self._checked_at: dict[int, float] = {}
        self._model_lock = threading.Lock()
        self._on_identified = on_identified
        self.identified = 0

    def _embed(self, crops: Sequence[Any]) -> np.ndarray:
        with self._model_lock:
            return self.embedder.embed_crops(crops)

    def run_model_check(self) -> str:
        """Run the model on one blank crop (health checks); returns the model version."""
        with self._model_lock:
            out = self.embedder.embed_tensor(self.embedder.dummy_batch(1))
        if not np.isfinite(out).all():
            raise RuntimeError("model produced non-finite output")
        return self.embedder.model_version

    def _embed_gallery_rows(self, rows: Sequence[GalleryRow]) -> list[GalleryRow]:
        """Load, crop and embed gallery detections; rows whose image cannot be read are left out."""
        loaded: list[GalleryRow] = []
        crops = []
        for row in rows:
            try:
                path, _ = resolve_image_uri(row.uri, root=self.options.image_root)
                image = decode_image(
                    read_limited(path, max_bytes=self.options.max_image_bytes),
                    max_pixels=self.options.max_image_pixels,
                )
            except (ImageRejected, OSError) as exc:
                logger.warning("gallery detection %d left out: %s", row.detection_id, exc)
                continue
            loaded.append(row)
            crops.append(crop(image, row.bbox))
        return fill_embeddings(loaded, self._embed(crops)) if loaded else []

    async def _load_gallery(self, site_id: int, version: int) -> Gallery:
        version_string = self.embedder.model_version
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(GALLERY_SQL, {"site_id": site_id, "cap": self.options.cap_per_deer})
            records = await cur.fetchall()
        rows = [GalleryRow.from_record(dict(r), model_version=version_string) for r in records]
        missing = [r for r in rows if r.embedding is None]
        if missing:
            filled = await asyncio.to_thread(self._embed_gallery_rows, missing)
            if filled:
                async with self.pool.connection() as conn:
                    await conn.execute(STORE_EMBEDDINGS_SQL, store_params(filled, model_version=version_string))
            done = {r.detection_id: r for r in filled}
            rows = [done.get(r.detection_id, r) for r in rows if r.embedding is not None or r.detection_id in done]
            logger.info("embedded %d of %d gallery detections of site %d", len(filled), len(missing), site_id)
        device = str(self.embedder.device)
        return build_gallery(site_id, rows=rows, model_version=version_string, version=version, device=device)

    async def galleries_for(self, site_ids: set[int]) -> dict[int, Gallery]:
        """Galleries of these sites, reloaded when their version counter moved (checked every refresh_s)."""
        now = time.monotonic()
        due = [s for s in site_ids if now - self._checked_at.get(s, -1e9) >= self.options.gallery_refresh_s]
        if due:
            async with self.pool.connection() as conn:
                vcur = conn.cursor(row_factory=dict_row)
                await vcur.execute(VERSIONS_SQL, (due,))
                versions = {int(r["site_id"]): int(r["version"]) for r in await vcur.fetchall()}
            for site_id in due:
                version = versions.get(site_id, 0)
                cached = self.galleries.get(site_id)
                if cached is None or cached.version != version:
                    self.galleries[site_id] = await self._load_gallery(site_id, version)
                    logger.info(
                        "gallery of site %d loaded: %d profiles (version %d)",
                        site_id,
                        self.galleries[site_id].size,
                        version,
                    )
                self._checked_at[site_id] = now
        return {s: self.galleries[s] for s in site_ids}

    def _score(self, vectors: np.ndarray, sites: Sequence[int], galleries: dict[int, Gallery]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(sites)
        for site_id, gallery in galleries.items():
            idx = [i for i, s in enumerate(sites) if s == site_id]
            sims = gallery.score(vectors[idx])
            for j, i in enumerate(idx):
                out[i] = sims[j]
        return out

    async def identify_batch(self, requests: Sequence[IdentifyRequest]) -> list[Identification]:
        """Identify a batch; stores every detection and queues one score row per detection x profile."""
        thresholds = self.thresholds
        vectors = await asyncio.to_thread(self._embed, [r.crop for r in requests])
        sites = [r.site_id for r in requests]
        galleries = await self.galleries_for(set(sites))
        sims = await asyncio.to_thread(self._score, vectors, sites, galleries)
        version = self.embedder.model_version
        results: list[Identification] = []
        for req, row_sims in zip(requests, sims, strict=True):
            gallery = galleries[req.site_id]
            order = np.argsort(-row_sims, kind="stable")
            top1 = float(row_sims[order[0]]) if len(order) else None
            decision = decide(top1, thresholds)
            deer_id = gallery.deer_ids[int(order[0])] if decision == "auto" else None
            candidates = [
                Candidate(gallery.deer_ids[int(i)], gallery.names[int(i)], round(float(row_sims[i]), 6))
                for i in order[: self.options.top_k]
            ]
            results.append(Identification(0, version, decision, deer_id, top1, candidates))

        def rows_for(ids: Sequence[int]) -> list[ScoreRow]:
            return [
                row
                for result, det_id, row_sims, req in zip(results, ids, sims, requests, strict=True)
                for row in score_rows(
                    det_id,
                    deer_ids=galleries[req.site_id].deer_ids,
                    similarities=row_sims,
                    threshold=thresholds.accept,
                    assigned_deer_id=result.deer_id,
                    model_version=version,
                )
            ]

        ids, pending = await self._store(requests, vectors, results, rows_for)
        if pending:
            self.scores.add(pending)
        self.identified += len(results)
        for result, det_id in zip(results, ids, strict=True):
            result.detection_id = det_id
            if self._on_identified:
                self._on_identified(result.decision, result.top1_similarity)
        return results

    async def _store(
        self,
        requests: Sequence[IdentifyRequest],
        vectors: np.ndarray,
        results: Sequence[Identification],
        rows_for: Callable[[Sequence[int]], list[ScoreRow]],
    ) -> tuple[list[int], list[ScoreRow]]:
        """Insert images (once per URI), detections and (inline) their score rows in one transaction.

        Returns the detection ids in order and the score rows still to be written through the buffer.
        """
        first: dict[str, IdentifyRequest] = {}
        for r in requests:
            first.setdefault(r.image_uri, r)
        imgs = list(first.values())
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                q.UPSERT_IMAGES_SQL,
                (
                    [r.camera_id for r in imgs],
                    [r.image_uri for r in imgs],
                    [r.captured_at for r in imgs],
                    [r.width for r in imgs],
                    [r.height for r in imgs],
                ),
            )
            image_ids = {row["uri"]: int(row["id"]) for row in await cur.fetchall()}
            await cur.execute(q.NEXT_DETECTION_IDS_SQL, (len(requests),))
            ids = [int(row["id"]) for row in await cur.fetchall()]
            await conn.execute(
                q.INSERT_DETECTIONS_SQL,
                (
                    ids,
                    [image_ids[r.image_uri] for r in requests],
                    [r.bbox.x for r in requests],
                    [r.bbox.y for r in requests],
                    [r.bbox.w for r in requests],
                    [r.bbox.h for r in requests],
                    [r.confidence for r in requests],
                    [res.deer_id for res in results],
                    [res.decision for res in results],
                    [res.top1_similarity for res in results],
                    [embedding_to_bytes(v) for v in vectors],
                    [res.model_version for res in results],
                ),
            )
            rows = rows_for(ids)
            if not self.options.inline_scores or not rows:
                return ids, rows
            try:
                async with conn.transaction():  # a savepoint: a refused COPY keeps the detections
                    await copy_scores_async(conn, rows)
            except psycopg.DatabaseError as exc:
                logger.warning("inline score write failed (%s); %d rows go through the buffer", exc, len(rows))
                return ids, rows
        self.scores.record_written(len(rows))
        return ids, []
