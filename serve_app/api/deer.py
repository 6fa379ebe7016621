"""Deer profiles: list, one profile with recent sightings, edit a profile, merge two profiles (store/deer.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from serve_app.api.deps import PrincipalDep, ResourcesDep
from serve_app.api.problems import Problem
from serve_app.store import deer

router = APIRouter(tags=["deer"])


class MergeIn(BaseModel):
    """The profile that absorbs this one."""

    model_config = ConfigDict(extra="forbid")

    into: int = Field(gt=0)
    note: str | None = Field(default=None, max_length=2000)


class DeerPatch(BaseModel):
    """The profile fields to change; a field left out stays as it is, null clears sex or notes."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)] | None = None
    sex: Literal["male", "female", "unknown"] | None = None
    notes: str | None = Field(default=None, max_length=2000)


@router.get("/api/deer", summary="Deer profiles of the key's sites")
async def list_deer(
    resources: ResourcesDep,
    principal: PrincipalDep,
    site_id: int | None = Query(default=None, gt=0),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0),
) -> dict[str, list[dict[str, Any]]]:
    """Active (not merged) profiles with their sighting counts, last sighting and ``best_detection_id``, the
    detection that pictures each (a person's decision first, then the detector's confidence, then the newest)."""
    rows = await deer.list_deer(
        resources.pool, sites=principal.site_filter(), site_id=site_id, limit=limit, offset=offset
    )
    return {"items": [dict(r) for r in rows]}


@router.get("/api/deer/{deer_id}", summary="One profile with its recent sightings")
async def get_deer(
    deer_id: int, resources: ResourcesDep, principal: PrincipalDep, sightings: int = Query(default=20, ge=1, le=200)
) -> dict[str, Any]:
    """The profile, its sighting count, last sighting and picturing detection, its newest sightings and its
    sightings per UTC week (``week_start`` a Monday; weeks without any are left out)."""
    detail = await deer.profile_with_sightings(
        resources.pool, deer_id=deer_id, sites=principal.site_filter(), sightings=sightings
    )
    return {
        **detail["profile"],
        **detail["stats"],
        "recent_sightings": [dict(r) for r in detail["recent"]],
        "sightings_per_week": [dict(w) for w in detail["weekly"]],
    }


@router.patch("/api/deer/{deer_id}", summary="Edit a profile's name, sex or notes")
async def patch_deer(deer_id: int, body: DeerPatch, resources: ResourcesDep, principal: PrincipalDep) -> dict[str, Any]:
    """Changes the fields the body names and answers the whole profile; a merged profile is read-only."""
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise Problem(422, "empty-patch", "name at least one of name, sex, notes")
    if "name" in changes and changes["name"] is None:
        raise Problem(422, "name-required", "a profile's name cannot be cleared")
    profile = await deer.update_deer(resources.pool, deer_id=deer_id, sites=principal.site_filter(), changes=changes)
    return dict(profile)


@router.post("/api/deer/{deer_id}/merge", summary="Merge this profile into another of the same site")
async def merge_deer(deer_id: int, body: MergeIn, resources: ResourcesDep, principal: PrincipalDep) -> dict[str, Any]:
    """Moves every detection to ``into`` (decisions kept) and marks this profile merged; audited."""
    if body.into == deer_id:
        raise Problem(422, "merge-into-self", "a profile cannot be merged into itself")
    moved = await deer.merge_deer(
        resources.pool,
        deer_id=deer_id,
        into=body.into,
        sites=principal.site_filter(),
        key_id=principal.key_id,
        note=body.note,
    )
    return {"deer_id": deer_id, "merged_into": body.into, "detections_moved": moved}
