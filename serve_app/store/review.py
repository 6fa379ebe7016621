"""Review: the review-band queue and a person's assignment of one detection (audited in review_events).

``sites`` is the caller's site filter (``Principal.site_filter()``: None means every site); a detection of
another site is answered as :class:`NotFound`, exactly like one that does not exist.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal, TypedDict, cast

from serve_app.errors import DeerMerged, DeerNotInSite, NotFound
from serve_app.store.audit import Action, ReviewEvent, key_actor, record_event
from serve_app.store.db import Pool
from serve_app.store.deer import BEST_DETECTION_SQL, create_deer

# A candidate's picture is its profile's best detection (BEST_DETECTION_SQL). "informative" puts the items closest
# to the accept threshold first: the ones a decision moves most.
ITEM_SQL = f"""
SELECT d.id AS detection_id, d.decision, d.deer_id, d.reviewed_at, d.top1_similarity, d.model_version,
       d.created_at, i.uri AS image_uri, i.captured_at, c.id AS camera_id, c.site_id,
       d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h, top.threshold AS accept_threshold,
       coalesce((SELECT json_agg(json_build_object(
                            'deer_id', s.deer_id, 'name', e.name, 'similarity', s.similarity,
                            'best_detection_id', {BEST_DETECTION_SQL.format(deer_id="s.deer_id")})
                                 ORDER BY s.rank)
                 FROM reid_similarity_scores s JOIN deer e ON e.id = s.deer_id
                 WHERE s.detection_id = d.id AND s.model_version = d.model_version AND s.source = 'online'
                   AND s.rank <= %(k)s), '[]') AS candidates
FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id
LEFT JOIN LATERAL (
    SELECT s.threshold FROM reid_similarity_scores s
    WHERE s.detection_id = d.id AND s.model_version = d.model_version AND s.source = 'online' AND s.rank = 1
    LIMIT 1
) top ON true
"""
QUEUE_WHERE = """
WHERE d.decision = 'review' AND (%(sites)s::bigint[] IS NULL OR c.site_id = ANY(%(sites)s))
  AND (%(site_id)s::bigint IS NULL OR c.site_id = %(site_id)s)
  AND (%(camera_id)s::bigint IS NULL OR c.id = %(camera_id)s)
  AND (%(since)s::timestamptz IS NULL OR i.captured_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR i.captured_at < %(until)s)
  AND (%(min_similarity)s::float8 IS NULL OR d.top1_similarity >= %(min_similarity)s)
  AND (%(max_similarity)s::float8 IS NULL OR d.top1_similarity <= %(max_similarity)s)
"""
REVIEW_SQL = (
    ITEM_SQL
    + QUEUE_WHERE
    + """
ORDER BY CASE WHEN %(order)s = 'informative' THEN abs(d.top1_similarity - top.threshold) END NULLS LAST,
         d.created_at, d.id
LIMIT %(limit)s OFFSET %(offset)s
"""
)
REVIEW_COUNT_SQL = (
    """
SELECT count(*) AS n
FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id"""
    + QUEUE_WHERE
)
ONE_ITEM_SQL = (
    ITEM_SQL
    + """
WHERE d.id = %(detection_id)s AND (%(sites)s::bigint[] IS NULL OR c.site_id = ANY(%(sites)s))
"""
)
EVENTS_SQL = """
SELECT action, deer_id, from_deer_id, to_deer_id, from_decision, to_decision, actor, note, created_at
FROM review_events WHERE detection_id = %s ORDER BY created_at, id
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
    """A profile the model proposed for a detection, best first, with the detection that pictures it."""

    deer_id: int
    name: str
    similarity: float
    best_detection_id: int | None


class ReviewItem(TypedDict):
    """A detection waiting for review, with its image, box and candidates."""

    detection_id: int
    decision: str
    deer_id: int | None
    reviewed_at: datetime | None
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
    accept_threshold: float | None
    candidates: list[Candidate]


@dataclass(frozen=True)
class QueueFilter:
    """Which review-band detections a reviewer asks for, and in which order."""

    site_id: int | None = None
    camera_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    min_similarity: float | None = None
    max_similarity: float | None = None
    order: Literal["informative", "oldest"] = "oldest"

    def params(self, sites: list[int] | None) -> dict[str, object]:
        """The SQL parameters of this filter for a caller limited to ``sites``."""
        return {"sites": sites, **asdict(self)}


class Assignment(TypedDict):
    """What a person's decision did to a detection."""

    detection_id: int
    deer_id: int | None
    decision: Literal["manual", "unassigned"]
    action: Action


async def review_queue(
    pool: Pool, *, sites: list[int] | None, limit: int, k: int, offset: int = 0, where: QueueFilter | None = None
) -> tuple[list[ReviewItem], int]:
    """Review-band detections of ``sites`` that match ``where``, each with its ``k`` best online candidates, and
    how many match in all."""
    params = (where or QueueFilter()).params(sites)
    async with pool.connection() as conn:
        rows = await (await conn.execute(REVIEW_SQL, {**params, "limit": limit, "k": k, "offset": offset})).fetchall()
        total = await (await conn.execute(REVIEW_COUNT_SQL, params)).fetchone()
    return cast(list[ReviewItem], rows), int(total["n"]) if total else 0


async def detection_item(
    pool: Pool, *, detection_id: int, sites: list[int] | None, k: int
) -> tuple[ReviewItem, list[dict[str, object]]]:
    """One detection of ``sites`` as the queue shows it (whatever its decision), and its review history, oldest
    first. NotFound for another site's detection, exactly like a missing one."""
    async with pool.connection() as conn:
        item = await (
            await conn.execute(ONE_ITEM_SQL, {"detection_id": detection_id, "sites": sites, "k": k})
        ).fetchone()
        if item is None:
            raise NotFound(f"detection {detection_id} not found")
        events = await (await conn.execute(EVENTS_SQL, (detection_id,))).fetchall()
    return cast(ReviewItem, item), [dict(e) for e in events]


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
