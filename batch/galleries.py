"""Site galleries for the backfill: the online path's rows, rule and matrix, with a no-write mode.

Gallery detections lacking an embedding for the model version are embedded from their exact
(full-decode) crops, like the online path does, and stored unless the run is a dry run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from batch.crops import UnreadableImage, image_path, open_frame
from serve_app.reid.embedder import Embedder
from serve_app.reid.gallery import DEFAULT_CAP_PER_DEER, Gallery, build_gallery, fill_gallery
from serve_app.store.db import SyncConn, connect
from serve_app.store.galleries import gallery_rows, site_versions, store_embeddings

logger = logging.getLogger(__name__)


def load_site_gallery(
    conn: SyncConn,
    site_id: int,
    *,
    embedder: Embedder,
    image_root: Path,
    store: bool,
    cap_per_deer: int = DEFAULT_CAP_PER_DEER,
) -> tuple[Gallery, int]:
    """A site's gallery on the embedder's device and the number of gallery detections it had to embed."""
    model_version = embedder.model_version
    version = site_versions(conn, [site_id]).get(site_id, 0)
    contents = fill_gallery(
        gallery_rows(conn, site_id, cap_per_deer=cap_per_deer),
        model_version=model_version,
        load=lambda row: open_frame(image_path(row.uri, root=image_root)),
        embed=embedder.embed_crops,
        unreadable=(UnreadableImage,),
    )
    if store and contents.fresh:
        store_embeddings(conn, contents.fresh_embeddings(), model_version=model_version)
    conn.commit()
    gallery = build_gallery(
        site_id, rows=contents.held, model_version=model_version, version=version, device=str(embedder.device)
    )
    return gallery, len(contents.fresh)


def load_galleries(
    dsn: str, site_ids: Iterable[int], *, embedder: Embedder, image_root: Path, store: bool
) -> dict[int, Gallery]:
    """Galleries of several sites, read on one connection."""
    galleries: dict[int, Gallery] = {}
    with connect(dsn) as conn:
        for site_id in site_ids:
            galleries[site_id], embedded = load_site_gallery(
                conn, site_id, embedder=embedder, image_root=image_root, store=store
            )
            if embedded:
                logger.info("embedded %d gallery detections of site %d", embedded, site_id)
    return galleries
