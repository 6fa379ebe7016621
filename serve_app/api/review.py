"""Review: the review-band queue and manual assignments (store/review.py records each in review_events with the
key that made it)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.api.deps import PrincipalDep, ResourcesDep
from serve_app.store import review

router = APIRouter(tags=["review"])


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
    rows = await review.review_queue(resources.pool, sites=principal.site_filter(), limit=limit, k=k)
    return {"items": [dict(r) for r in rows]}


@router.post("/api/detections/{detection_id}/assignment", summary="Assign, create a profile for, or unassign")
async def assign(
    detection_id: int, body: AssignmentIn, resources: ResourcesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """A manual decision; automatic passes never overwrite it (reviewed_at is set); a merged profile is a 409."""
    done = await review.assign_detection(
        resources.pool,
        detection_id=detection_id,
        sites=principal.site_filter(),
        key_id=principal.key_id,
        deer_id=body.deer_id,
        new_deer_name=body.new_deer.name if body.new_deer is not None else None,
        note=body.note,
    )
    return dict(done)
