"""Gallery rows in Postgres: a site's profiles and their newest detections, version counters, stored embeddings.

One SQL constant per statement, run by a sync function (batch) and an async one (the Serve replica).
What a gallery holds is decided from these rows by :func:`serve_app.reid.gallery.gallery_contents`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from serve_app.store.db import AsyncConn, Row, SyncConn

# Site scoping and merged profiles: only the site's surviving profiles (a merge moves the merged profile's
# detections to the survivor), each with its ``cap`` newest detections. The model that made a stored embedding
# is recorded in embedding_model_version; NULL means the decision's model, which the online path stores
# together with the embedding.
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


def _versions(rows: Sequence[Row]) -> dict[int, int]:
    return {int(r["site_id"]): int(r["version"]) for r in rows}


def _store_params(embeddings: Mapping[int, bytes], *, model_version: str) -> tuple[str, list[int], list[bytes]]:
    return model_version, list(embeddings), list(embeddings.values())


def site_versions(conn: SyncConn, site_ids: Collection[int]) -> dict[int, int]:
    """The gallery version counter of each site that has one (a site without one is at 0)."""
    return _versions(conn.execute(VERSIONS_SQL, (list(site_ids),)).fetchall())


async def site_versions_async(conn: AsyncConn, site_ids: Collection[int]) -> dict[int, int]:
    """:func:`site_versions` on an async connection."""
    return _versions(await (await conn.execute(VERSIONS_SQL, (list(site_ids),))).fetchall())


def gallery_rows(conn: SyncConn, site_id: int, *, cap_per_deer: int) -> list[Row]:
    """The site's gallery rows: each surviving profile's ``cap_per_deer`` newest detections, profile by profile."""
    return conn.execute(GALLERY_SQL, {"site_id": site_id, "cap": cap_per_deer}).fetchall()


async def gallery_rows_async(conn: AsyncConn, site_id: int, *, cap_per_deer: int) -> list[Row]:
    """:func:`gallery_rows` on an async connection."""
    return await (await conn.execute(GALLERY_SQL, {"site_id": site_id, "cap": cap_per_deer})).fetchall()


def store_embeddings(conn: SyncConn, embeddings: Mapping[int, bytes], *, model_version: str) -> None:
    """Record stored-form embeddings by detection id as ``model_version``'s (the decision's model stays)."""
    conn.execute(STORE_EMBEDDINGS_SQL, _store_params(embeddings, model_version=model_version))


async def store_embeddings_async(conn: AsyncConn, embeddings: Mapping[int, bytes], *, model_version: str) -> None:
    """:func:`store_embeddings` on an async connection."""
    await conn.execute(STORE_EMBEDDINGS_SQL, _store_params(embeddings, model_version=model_version))
