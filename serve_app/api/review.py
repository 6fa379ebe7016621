"""Review: the review-band queue and manual assignments (recorded in review_events with the key that made them)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.api.deps import PrincipalDep, ResourcesDep
from serve_app.api.problems import Problem
from serve_app.errors import NotFound

router = APIRouter(tags=["review"])

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


class NewDeer(BaseModel):
    """A profile created by the assignment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)


class AssignmentIn(BaseModel):
    """Exactly one of deer_id, new_deer or unassign; an optional note."""

    model_config = ConfigDict(extra="forbid")

    deer_id: int | None = Field(default=None, gt=0)
    new_deer: NewDeer | None = None
    unassign: bool = False
    note: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def _one_action(self) -> AssignmentIn:
        if sum([self.deer_id is not None, self.new_deer is not None, self.unassign]) != 1:
            raise ValueError("give exactly one of deer_id, new_deer or unassign: true")
        return self


@router.get("/api/review", summary="Detections waiting for review, with their candidates")
async def review_queue(
    resources: ResourcesDep,
    principal: PrincipalDep,
    limit: int = Query(default=50, ge=1, le=500),
    k: int = Query(default=5, ge=1, le=50),
) -> dict[str, list[dict[str, Any]]]:
    """Review-band detections of the key's sites, oldest first."""
    async with resources.pool.connection() as conn:
        cur = await conn.execute(REVIEW_SQL, {"sites": principal.site_filter(), "limit": limit, "k": k})
        rows: list[Any] = await cur.fetchall()
    return {"items": [dict(r) for r in rows]}


@router.post("/api/detections/{detection_id}/assignment", summary="Assign, create a profile for, or unassign")
async def assign(
    detection_id: int, body: AssignmentIn, resources: ResourcesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """A manual decision; automatic passes never overwrite it (reviewed_at is set); a merged profile is a 409."""
    actor = f"api-key:{principal.key_id}"
    async with resources.pool.connection() as conn, conn.transaction():
        # The chosen profile is locked before the detection, in the merge's order (deer, then detections),
        # and FOR SHARE, which the merge's FOR UPDATE waits on: it cannot be merged away before commit.
        target: Any = None
        if body.deer_id is not None:
            sites = principal.site_filter()
            target = await (await conn.execute(TARGET_SQL, (body.deer_id, sites, sites))).fetchone()
        det: Any = await (await conn.execute(DETECTION_SQL, (detection_id,))).fetchone()
        if det is None or not principal.allows(int(det["site_id"])):
            raise NotFound(f"detection {detection_id} not found")
        site_id = int(det["site_id"])
        action = "assign"
        if body.new_deer is not None:
            row: Any = await (
                await conn.execute(
                    "INSERT INTO deer (site_id, name) VALUES (%s, %s) RETURNING id", (site_id, body.new_deer.name)
                )
            ).fetchone()
            to_deer: int | None = int(row["id"])
            action = "new_deer"
        elif body.unassign:
            to_deer, action = None, "unassign"
        else:
            if target is None or int(target["site_id"]) != site_id:
                raise Problem(422, "deer-not-in-site", "the deer profile does not exist at this detection's site")
            if target["merged_into"] is not None:
                raise Problem(409, "deer-merged", f"deer {body.deer_id} was merged into {target['merged_into']}")
            to_deer = body.deer_id
        to_decision = "unassigned" if to_deer is None else "manual"
        await conn.execute(
            "UPDATE detections SET deer_id = %s, decision = %s, reviewed_by = %s, reviewed_at = now() WHERE id = %s",
            (to_deer, to_decision, principal.key_id, detection_id),
        )
        await conn.execute(
            "INSERT INTO review_events (detection_id, deer_id, action, from_deer_id, to_deer_id, from_decision,"
            " to_decision, api_key_id, actor, note) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                detection_id,
                to_deer,
                action,
                det["deer_id"],
                to_deer,
                det["decision"],
                to_decision,
                principal.key_id,
                actor,
                body.note,
            ),
        )
    return {"detection_id": detection_id, "deer_id": to_deer, "decision": to_decision, "action": action}
