"""Review: the review-band queue and manual assignments (store/review.py records each in review_events with the
key that made it)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.api.deps import PrincipalDep, ResourcesDep
from serve_app.api.problems import Problem
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
    offset: int = Query(default=0, ge=0, le=1_000_000),
    k: int = Query(default=5, ge=1, le=50),
    site_id: int | None = Query(default=None, gt=0, description="only this site (of the key's)"),
    camera_id: int | None = Query(default=None, gt=0, description="only this camera"),
    since: Annotated[dt.datetime | None, Query(description="captured at or after (ISO 8601)")] = None,
    until: Annotated[dt.datetime | None, Query(description="captured before (ISO 8601)")] = None,
    min_similarity: float | None = Query(default=None, ge=-1, le=1, description="top-1 similarity at least"),
    max_similarity: float | None = Query(default=None, ge=-1, le=1, description="top-1 similarity at most"),
    order: Literal["informative", "oldest"] = Query(
        default="oldest", description="oldest: first in, first out; informative: closest to the accept threshold first"
    ),
) -> dict[str, Any]:
    """Review-band detections of the key's sites that match the filters, and how many match in all (``total``)."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise Problem(422, "naive-datetime", f"{name} needs a UTC offset (e.g. 2026-05-01T00:00:00Z)")
    if since is not None and until is not None and until <= since:
        raise Problem(422, "empty-range", "until must be after since")
    if min_similarity is not None and max_similarity is not None and max_similarity < min_similarity:
        raise Problem(422, "empty-band", "max_similarity must be at least min_similarity")
    where = review.QueueFilter(
        site_id=site_id, camera_id=camera_id, since=since, until=until,
        min_similarity=min_similarity, max_similarity=max_similarity, order=order,
    )  # fmt: skip
    rows, total = await review.review_queue(
        resources.pool, sites=principal.site_filter(), limit=limit, k=k, offset=offset, where=where
    )
    return {"items": [dict(r) for r in rows], "total": total}


@router.get("/api/detections/{detection_id}", summary="One detection with its candidates and review history")
async def get_detection(
    detection_id: int, resources: ResourcesDep, principal: PrincipalDep, k: int = Query(default=5, ge=1, le=50)
) -> dict[str, Any]:
    """The detection as the review queue shows it, whatever its decision, plus ``review_events`` (each decision
    with its note, oldest first); 404 for another site's detection."""
    item, events = await review.detection_item(
        resources.pool, detection_id=detection_id, sites=principal.site_filter(), k=k
    )
    return {**item, "review_events": events}


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
