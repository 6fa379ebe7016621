"""What the ingress sends to the ReID deployment and what it answers; the SQL that stores detections."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

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


UPSERT_IMAGES_SQL = """
INSERT INTO images (camera_id, uri, captured_at, width, height)
SELECT * FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[], %s::int[], %s::int[])
ON CONFLICT (uri) DO UPDATE SET uri = EXCLUDED.uri
RETURNING id, uri
"""

NEXT_DETECTION_IDS_SQL = (
    "SELECT nextval(pg_get_serial_sequence('detections', 'id')) AS id FROM generate_series(1, %s) ORDER BY 1"
)

INSERT_DETECTIONS_SQL = """
INSERT INTO detections (id, image_id, bbox_x, bbox_y, bbox_w, bbox_h, confidence, deer_id, decision,
                        top1_similarity, embedding, model_version)
SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::float8[], %s::float8[], %s::float8[], %s::float8[],
                     %s::float8[], %s::bigint[], %s::text[], %s::float8[], %s::bytea[], %s::text[])
"""
