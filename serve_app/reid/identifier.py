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
from PIL import Image
from psycopg.rows import dict_row

from serve_app.caching import BoundedCache
from serve_app.errors import ImageConflict
from serve_app.images import ImageRejected, decode_image, read_limited, resolve_image_uri
from serve_app.reid import identification as q
from serve_app.reid.decision import Thresholds, decide
from serve_app.reid.embedder import Embedder, embedding_to_bytes
from serve_app.reid.gallery import Gallery, GalleryRow, build_gallery, fill_gallery
from serve_app.reid.identification import Candidate, Identification, IdentifyRequest, Scores
from serve_app.reid.score_buffer import ScoreBuffer
from serve_app.reid.scores import ScoreRow, copy_scores_async, score_rows
from serve_app.store.db import Pool
from serve_app.store.galleries import gallery_rows_async, site_versions_async, store_embeddings_async

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdentifierOptions:
    """Gallery and answer tuning."""

    image_root: Path
    cap_per_deer: int = 20
    gallery_refresh_s: float = 1.0
    top_k: int = 5
    max_galleries: int = 256
    """Most site galleries held at once (one embedding matrix each); a site beyond it is loaded again when asked."""
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
        pool: Pool,
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
        self.galleries: BoundedCache[int, tuple[Gallery, float]] = BoundedCache(
            name="site galleries", max_entries=options.max_galleries
        )
        """Site -> (gallery, when its version was last checked); the least recently used site goes first."""
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

    def _read_image(self, row: GalleryRow) -> Image.Image:
        """A gallery detection's frame, under the same confinement and size limits as a request's image."""
        path, _ = resolve_image_uri(row.uri, root=self.options.image_root)
        data = read_limited(path, max_bytes=self.options.max_image_bytes)
        return decode_image(data, max_pixels=self.options.max_image_pixels)

    async def _load_gallery(self, site_id: int, version: int) -> Gallery:
        model_version = self.embedder.model_version
        async with self.pool.connection() as conn:
            records = await gallery_rows_async(conn, site_id, cap_per_deer=self.options.cap_per_deer)
        contents = await asyncio.to_thread(
            fill_gallery, records, model_version=model_version, load=self._read_image, embed=self._embed,
            unreadable=(ImageRejected, OSError),
        )  # fmt: skip
        if contents.fresh:
            async with self.pool.connection() as conn:
                await store_embeddings_async(conn, contents.fresh_embeddings(), model_version=model_version)
        if contents.fresh or contents.to_embed:
            missing = len(contents.fresh) + len(contents.to_embed)
            logger.info("embedded %d of %d gallery detections of site %d", len(contents.fresh), missing, site_id)
        device = str(self.embedder.device)
        return build_gallery(site_id, rows=contents.held, model_version=model_version, version=version, device=device)

    async def galleries_for(self, site_ids: set[int]) -> dict[int, Gallery]:
        """Galleries of these sites, reloaded when their version counter moved (checked every refresh_s)."""
        now = time.monotonic()
        out: dict[int, Gallery] = {}
        due = []
        for site_id in site_ids:
            held = self.galleries.get(site_id)
            if held is not None and now - held[1] < self.options.gallery_refresh_s:
                out[site_id] = held[0]
            else:
                due.append(site_id)
        if due:
            async with self.pool.connection() as conn:
                versions = await site_versions_async(conn, due)
            for site_id in due:
                version = versions.get(site_id, 0)
                held = self.galleries.get(site_id)
                gallery = held[0] if held is not None and held[0].version == version else None
                if gallery is None:
                    gallery = await self._load_gallery(site_id, version)
                    logger.info("gallery of site %d loaded: %d profiles (version %d)", site_id, gallery.size, version)
                self.galleries.put(site_id, (gallery, now))
                out[site_id] = gallery
        return out

    def _score(self, vectors: np.ndarray, sites: Sequence[int], galleries: dict[int, Gallery]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(sites)
        for site_id, gallery in galleries.items():
            idx = [i for i, s in enumerate(sites) if s == site_id]
            sims = gallery.score(vectors[idx])
            for j, i in enumerate(idx):
                out[i] = sims[j]
        return out

    def _answer(self, scores: Scores, *, thresholds: Thresholds, version: str) -> Identification:
        """The decision and top-k candidates for one detection's scores (its id is filled in once stored)."""
        sims = scores.similarities
        order = np.argsort(-sims, kind="stable")
        top1 = float(sims[order[0]]) if len(order) else None
        decision = decide(top1, thresholds)
        deer_id = scores.deer_ids[int(order[0])] if decision == "auto" else None
        candidates = [
            Candidate(scores.deer_ids[int(i)], scores.names[int(i)], round(float(sims[i]), 6))
            for i in order[: self.options.top_k]
        ]
        return Identification(0, version, decision, deer_id, top1, candidates)

    async def identify_batch(self, requests: Sequence[IdentifyRequest]) -> list[Identification | ImageConflict]:
        """Identify a batch; stores every detection and queues one score row per detection x profile.

        A request whose image_uri is recorded for another camera or capture time gets an
        :class:`ImageConflict` in its place (the others in the batch are stored as usual).
        """
        thresholds = self.thresholds
        vectors = await asyncio.to_thread(self._embed, [r.crop for r in requests])
        sites = [r.site_id for r in requests]
        galleries = await self.galleries_for(set(sites))
        sims = await asyncio.to_thread(self._score, vectors, sites, galleries)
        scored = [
            Scores(list(galleries[r.site_id].deer_ids), list(galleries[r.site_id].names), row_sims)
            for r, row_sims in zip(requests, sims, strict=True)
        ]
        outcomes, pending = await self._store(requests, vectors, scored, thresholds=thresholds)
        if pending:
            self.scores.add(pending)
        for outcome in outcomes:
            if isinstance(outcome, Identification):
                self.identified += 1
                if self._on_identified:
                    self._on_identified(outcome.decision, outcome.top1_similarity)
        return outcomes

    async def _store(
        self,
        requests: Sequence[IdentifyRequest],
        vectors: np.ndarray,
        scored: Sequence[Scores],
        *,
        thresholds: Thresholds,
    ) -> tuple[list[Identification | ImageConflict], list[ScoreRow]]:
        """Decide and insert images (new URIs only), detections and (inline) their score rows in one transaction.

        An existing image is used only when its camera and capture time are the request's. The chosen
        profiles are locked FOR SHARE and followed through ``merged_into``, so a detection never lands on
        a profile merged away since the gallery was loaded. Returns one outcome per request and the score
        rows still to be written through the buffer.
        """
        version = self.embedder.model_version
        first: dict[str, IdentifyRequest] = {}
        for r in requests:
            first.setdefault(r.image_uri, r)
        imgs = list(first.values())
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                q.INSERT_IMAGES_SQL,
                (
                    [r.camera_id for r in imgs],
                    [r.image_uri for r in imgs],
                    [r.captured_at for r in imgs],
                    [r.width for r in imgs],
                    [r.height for r in imgs],
                ),
            )
            images = {row["uri"]: row for row in await cur.fetchall()}
            existing = [uri for uri in first if uri not in images]
            if existing:
                await cur.execute(q.EXISTING_IMAGES_SQL, (existing,))
                images.update({row["uri"]: row for row in await cur.fetchall()})
            keep = [
                i for i, r in enumerate(requests) if r.image_uri in images and q.image_matches(images[r.image_uri], r)
            ]
            kept = [requests[i] for i in keep]
            kept_scores = [scored[i] for i in keep]
            answers = [self._answer(s, thresholds=thresholds, version=version) for s in kept_scores]
            survivors: dict[int, tuple[int, str]] = {}
            # Every profile the score rows name, in one id-ordered lock (the merge locks in id order too, and
            # the score log's reference check locks the same rows): then the chosen ones' survivors, if any.
            wanted = {int(d) for s in kept_scores for d in s.deer_ids}
            while wanted := wanted - survivors.keys():
                survivors.update(await q.lock_profiles(conn, deer_ids=wanted))
                merged = {d: t for d, t in survivors.items() if t[0] != d}
                if merged:
                    kept_scores = [s.merged(merged) for s in kept_scores]
                    answers = [self._answer(s, thresholds=thresholds, version=version) for s in kept_scores]
                wanted = {a.deer_id for a in answers if a.deer_id is not None}
            ids: list[int] = []
            if kept:
                await cur.execute(q.NEXT_DETECTION_IDS_SQL, (len(kept),))
                ids = [int(row["id"]) for row in await cur.fetchall()]
                await conn.execute(
                    q.INSERT_DETECTIONS_SQL,
                    (
                        ids,
                        [int(images[r.image_uri]["id"]) for r in kept],
                        [r.bbox.x for r in kept],
                        [r.bbox.y for r in kept],
                        [r.bbox.w for r in kept],
                        [r.bbox.h for r in kept],
                        [r.confidence for r in kept],
                        [a.deer_id for a in answers],
                        [a.decision for a in answers],
                        [a.top1_similarity for a in answers],
                        [embedding_to_bytes(vectors[i]) for i in keep],
                        [a.model_version for a in answers],
                    ),
                )
            for det_id, answer in zip(ids, answers, strict=True):
                answer.detection_id = det_id
            rows = [
                row
                for det_id, answer, s in zip(ids, answers, kept_scores, strict=True)
                for row in score_rows(
                    det_id,
                    deer_ids=s.deer_ids,
                    similarities=s.similarities,
                    threshold=thresholds.accept,
                    assigned_deer_id=answer.deer_id,
                    model_version=version,
                )
            ]
            outcomes: list[Identification | ImageConflict] = [ImageConflict(r.image_uri) for r in requests]
            for i, answer in zip(keep, answers, strict=True):
                outcomes[i] = answer
            if not self.options.inline_scores or not rows:
                return outcomes, rows
            try:
                async with conn.transaction():  # a savepoint: a refused COPY keeps the detections
                    await copy_scores_async(conn, rows)
            except psycopg.DatabaseError as exc:
                logger.warning("inline score write failed (%s); %d rows go through the buffer", exc, len(rows))
                return outcomes, rows
        self.scores.record_written(len(rows))
        return outcomes, []
