"""What the ingress sends to the ReID deployment and what it answers; the SQL that stores detections."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import psycopg
from PIL import Image
from psycopg.rows import dict_row

from serve_app.reid.preprocessing import BBox


@dataclass
class IdentifyRequest:
    """One detection to identify: where it comes from and its crop (already decoded and verified)."""

    site_id: int
    camera_id: int
    image_uri: str
    captured_at: dt.datetime
    width: int
    height: int
    bbox: BBox
    crop: Image.Image
    confidence: float | None = None


@dataclass(frozen=True)
class Candidate:
    """A profile and its similarity (best first in a list)."""

    deer_id: int
    name: str
    similarity: float


@dataclass
class Identification:
    """The answer for one detection."""

    detection_id: int
    model_version: str
    decision: str
    deer_id: int | None
    top1_similarity: float | None
    candidates: list[Candidate] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The API shape (without internal fields)."""
        body = asdict(self)
        body.pop("top1_similarity")
        return body


@dataclass(frozen=True)
class Scores:
    """One detection's similarities against its site's profiles, in gallery order."""

    deer_ids: list[int]
    names: list[str]
    similarities: np.ndarray

    def merged(self, survivors: Mapping[int, tuple[int, str]]) -> Scores:
        """Merged-away profiles folded into their survivors, each scoring the max of its members (as a
        reloaded gallery would: the survivor then holds both profiles' embeddings)."""
        if not any(d in survivors for d in self.deer_ids):
            return self
        best: dict[int, float] = {}
        names: dict[int, str] = {}
        for deer_id, name, sim in zip(self.deer_ids, self.names, self.similarities.tolist(), strict=True):
            target, target_name = survivors.get(deer_id, (deer_id, name))
            if target not in best or sim > best[target]:
                best[target] = sim
            names.setdefault(target, target_name)
        ids = list(best)
        return Scores(ids, [names[i] for i in ids], np.asarray([best[i] for i in ids], dtype=np.float32))


def image_matches(row: Mapping[str, Any], request: IdentifyRequest) -> bool:
    """Whether a stored image row is the request's image: same camera and same capture time."""
    return int(row["camera_id"]) == request.camera_id and row["captured_at"] == request.captured_at


async def recorded_elsewhere(
    conn: psycopg.AsyncConnection[Any], *, uri: str, camera_id: int, captured_at: dt.datetime
) -> bool:
    """Whether ``uri`` is already an image of another camera or another capture time (the cheap pre-check;
    the insert checks again under lock)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(IMAGE_BY_URI_SQL, (uri,))
    row = await cur.fetchone()
    return row is not None and (int(row["camera_id"]) != camera_id or row["captured_at"] != captured_at)


async def lock_profiles(conn: psycopg.AsyncConnection[Any], *, deer_ids: Iterable[int]) -> dict[int, tuple[int, str]]:
    """Lock these profiles (FOR SHARE, until commit) and their merge chains; maps each to its survivor.

    Every id maps to ``(surviving id, its name)``; an active profile maps to itself. The survivors are
    locked too, so none of them can be merged away before the transaction commits.
    """
    survivor: dict[int, int] = {}
    names: dict[int, str] = {}
    pending = sorted(set(deer_ids))
    while pending:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(LOCK_PROFILES_SQL, (pending,))
        rows = await cur.fetchall()
        step: dict[int, int] = {}
        for row in rows:
            names[int(row["id"])] = str(row["name"])
            if row["merged_into"] is not None:
                step[int(row["id"])] = int(row["merged_into"])
        for deer_id in [*pending, *survivor]:
            survivor.setdefault(deer_id, deer_id)
        for deer_id, target in survivor.items():
            survivor[deer_id] = step.get(target, target)
        pending = sorted({t for t in step.values() if t not in names})
    return {d: (t, names.get(t, "")) for d, t in survivor.items()}


# An image row belongs to one camera: new URIs are inserted, an existing row is never touched (no upsert).
INSERT_IMAGES_SQL = """
INSERT INTO images (camera_id, uri, captured_at, width, height)
SELECT * FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[], %s::int[], %s::int[])
ON CONFLICT (uri) DO NOTHING
RETURNING id, uri, camera_id, captured_at
"""

# The rows the INSERT left alone (a new statement sees a concurrent insert that committed meanwhile);
# locked so that camera and capture time cannot change before the detections reference them.
EXISTING_IMAGES_SQL = """
SELECT id, uri, camera_id, captured_at FROM images WHERE uri = ANY(%s) ORDER BY id FOR KEY SHARE
"""

IMAGE_BY_URI_SQL = "SELECT camera_id, captured_at FROM images WHERE uri = %s"

# FOR SHARE conflicts with the merge's FOR UPDATE: a profile read here as active stays active until commit.
LOCK_PROFILES_SQL = "SELECT id, name, merged_into FROM deer WHERE id = ANY(%s) ORDER BY id FOR SHARE"

NEXT_DETECTION_IDS_SQL = (
    "SELECT nextval(pg_get_serial_sequence('detections', 'id')) AS id FROM generate_series(1, %s) ORDER BY 1"
)

INSERT_DETECTIONS_SQL = """
INSERT INTO detections (id, image_id, bbox_x, bbox_y, bbox_w, bbox_h, confidence, deer_id, decision,
                        top1_similarity, embedding, model_version)
SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::float8[], %s::float8[], %s::float8[], %s::float8[],
                     %s::float8[], %s::bigint[], %s::text[], %s::float8[], %s::bytea[], %s::text[])
"""
