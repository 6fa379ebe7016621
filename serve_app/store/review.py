"""Review: the review-band queue and a person's assignment of one detection (audited in review_events).

``sites`` is the caller's site filter (``Principal.site_filter()``: None means every site); a detection of
another site is answered as :class:`NotFound`, exactly like one that does not exist.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, TypedDict, cast

from serve_app.errors import DeerMerged, DeerNotInSite, NotFound
from serve_app.store.audit import Action, ReviewEvent, key_actor, record_event
from serve_app.store.db import Pool
from serve_app.store.deer import create_deer

REVIEW_SQL = """
SELECT d.id AS detection_id, d.top1_similarity, d.model_version, d.created_at, i.uri AS image_uri,
       i.captured_at, c.id AS camera_id, c.site_id,
       d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h,
       coalesce((SELECT json_agg(json_build_object('deer_id', s.deer_id, 'name', e.name, 'similarity', s.similarity)
                                 ORDER BY s.rank)
                 FROM reid_similarity_scores s JOIN deer e ON e.id = s.deer_id
                 WHERE s.detection_id = d.id AND s.model_version = d.model_version AND s.source = 'online'
                   AND s.rank <= %(k)s), '[]') AS candidates
FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id
WHERE d.decision = 'review' AND (%(sites)s::bigint[] IS NULL OR c.site_id = ANY(%(sites)s))
ORDER BY d.created_at, d.id
LIMIT %(limit)s
"""
DETECTION_SQL = """
SELECT d.id, d.deer_id, d.decision, c.site_id FROM detections d
JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id WHERE d.id = %s FOR UPDATE OF d
"""
# Only a profile of the key's sites is locked: another site's merges never wait on this key's requests.
TARGET_SQL = (
    "SELECT site_id, merged_into FROM deer WHERE id = %s AND (%s::bigint[] IS NULL OR site_id = ANY(%s)) FOR SHARE"
)
DECIDE_SQL = "UPDATE detections SET deer_id = %s, decision = %s, reviewed_by = %s, reviewed_at = now() WHERE id = %s"


class Candidate(TypedDict):
    """A profile the model proposed for a detection, best first."""

    deer_id: int
    name: str
    similarity: float


class ReviewItem(TypedDict):
    """A detection waiting for review, with its image, box and candidates."""

    detection_id: int
    top1_similarity: float | None
    model_version: str | None
    created_at: datetime
    image_uri: str
    captured_at: datetime
    camera_id: int
    site_id: int
    bbox_x: float
    bbox_y: float
    bbox_w: float
    bbox_h: float
    candidates: list[Candidate]


class Assignment(TypedDict):
    """What a person's decision did to a detection."""

    detection_id: int
    deer_id: int | None
    decision: Literal["manual", "unassigned"]
    action: Action


async def review_queue(pool: Pool, *, sites: list[int] | None, limit: int, k: int) -> list[ReviewItem]:
    """Review-band detections of ``sites``, oldest first, each with its ``k`` best online candidates."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(REVIEW_SQL, {"sites": sites, "limit": limit, "k": k})).fetchall()
    return cast(list[ReviewItem], rows)


async def assign_detection(
    pool: Pool,
    *,
    detection_id: int,
    sites: list[int] | None,
    key_id: int,
    deer_id: int | None = None,
    new_deer_name: str | None = None,
    note: str | None = None,
) -> Assignment:
    """A person's decision, in one transaction with its audit row: assign ``deer_id``, or create a profile named
    ``new_deer_name`` at the detection's site and assign it, or (neither given) unassign.

    The detection's reviewed_at is set, so automatic passes never overwrite the decision. NotFound when
    ``sites`` do not hold the detection; DeerNotInSite when ``deer_id`` is not a profile of its site;
    DeerMerged when that profile was merged away.
    """
    async with pool.connection() as conn, conn.transaction():
        # The chosen profile is locked before the detection, in the merge's order (deer, then detections),
        # and FOR SHARE, which the merge's FOR UPDATE waits on: it cannot be merged away before commit.
        target = None
        if deer_id is not None:
            target = await (await conn.execute(TARGET_SQL, (deer_id, sites, sites))).fetchone()
        det = await (await conn.execute(DETECTION_SQL, (detection_id,))).fetchone()
        if det is None or not (sites is None or int(det["site_id"]) in sites):
            raise NotFound(f"detection {detection_id} not found")
        site_id = int(det["site_id"])
        action: Action
        to_deer: int | None
        if new_deer_name is not None:
            to_deer, action = await create_deer(conn, site_id=site_id, name=new_deer_name), "new_deer"
        elif deer_id is None:
            to_deer, action = None, "unassign"
        else:
            if target is None or int(target["site_id"]) != site_id:
                raise DeerNotInSite()
            if target["merged_into"] is not None:
                raise DeerMerged(f"deer {deer_id} was merged into {target['merged_into']}")
            to_deer, action = deer_id, "assign"
        to_decision: Literal["manual", "unassigned"] = "unassigned" if to_deer is None else "manual"
        await conn.execute(DECIDE_SQL, (to_deer, to_decision, key_id, detection_id))
        event = ReviewEvent(
            action=action,
            actor=key_actor(key_id),
            site_id=site_id,
            detection_id=detection_id,
            deer_id=to_deer,
            from_deer_id=det["deer_id"],
            to_deer_id=to_deer,
            from_decision=det["decision"],
            to_decision=to_decision,
            api_key_id=key_id,
            note=note,
        )
        await record_event(conn, event)
    return Assignment(detection_id=detection_id, deer_id=to_deer, decision=to_decision, action=action)
