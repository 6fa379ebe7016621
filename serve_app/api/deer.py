"""Deer profiles: list, one profile with recent sightings, edit a profile, merge two profiles."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from serve_app.api.deps import PrincipalDep, ResourcesDep
from serve_app.api.problems import Problem
from serve_app.errors import NotFound

router = APIRouter(tags=["deer"])

LIST_SQL = """
SELECT e.id, e.site_id, e.name, e.sex, e.created_at,
       (SELECT count(*) FROM detections d WHERE d.deer_id = e.id) AS sightings,
       (SELECT max(i.captured_at) FROM detections d JOIN images i ON i.id = d.image_id WHERE d.deer_id = e.id)
           AS last_seen
FROM deer e
WHERE e.merged_into IS NULL AND (%(sites)s::bigint[] IS NULL OR e.site_id = ANY(%(sites)s))
  AND (%(site)s::bigint IS NULL OR e.site_id = %(site)s)
ORDER BY e.id LIMIT %(limit)s OFFSET %(offset)s
"""

SIGHTINGS_SQL = """
SELECT d.id AS detection_id, d.decision, d.top1_similarity, i.uri AS image_uri, i.captured_at, i.camera_id
FROM detections d JOIN images i ON i.id = d.image_id
WHERE d.deer_id = %s ORDER BY i.captured_at DESC, d.id DESC LIMIT %s
"""


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


PROFILE_COLUMNS = "id, site_id, name, sex, notes, created_at, merged_into"


async def _visible_deer(conn: Any, deer_id: int, principal: Any, *, lock: bool = False) -> Any:
    sql = f"SELECT {PROFILE_COLUMNS} FROM deer WHERE id = %s"
    row = await (await conn.execute(sql + (" FOR UPDATE" if lock else ""), (deer_id,))).fetchone()
    if row is None or not principal.allows(int(row["site_id"])):
        raise NotFound(f"deer {deer_id} not found")
    return row


@router.get("/api/deer", summary="Deer profiles of the key's sites")
async def list_deer(
    resources: ResourcesDep,
    principal: PrincipalDep,
    site_id: int | None = Query(default=None, gt=0),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0),
) -> dict[str, list[dict[str, Any]]]:
    """Active (not merged) profiles with their sighting counts."""
    params = {"sites": principal.site_filter(), "site": site_id, "limit": limit, "offset": offset}
    async with resources.pool.connection() as conn:
        rows: list[Any] = await (await conn.execute(LIST_SQL, params)).fetchall()
    return {"items": [dict(r) for r in rows]}


@router.get("/api/deer/{deer_id}", summary="One profile with its recent sightings")
async def get_deer(
    deer_id: int, resources: ResourcesDep, principal: PrincipalDep, sightings: int = Query(default=20, ge=1, le=200)
) -> dict[str, Any]:
    """The profile and its newest sightings."""
    async with resources.pool.connection() as conn:
        row = await _visible_deer(conn, deer_id, principal)
        recent: list[Any] = await (await conn.execute(SIGHTINGS_SQL, (deer_id, sightings))).fetchall()
    return {**dict(row), "recent_sightings": [dict(r) for r in recent]}


@router.patch("/api/deer/{deer_id}", summary="Edit a profile's name, sex or notes")
async def patch_deer(deer_id: int, body: DeerPatch, resources: ResourcesDep, principal: PrincipalDep) -> dict[str, Any]:
    """Changes the fields the body names and answers the whole profile; a merged profile is read-only."""
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise Problem(422, "empty-patch", "name at least one of name, sex, notes")
    if "name" in changes and changes["name"] is None:
        raise Problem(422, "name-required", "a profile's name cannot be cleared")
    async with resources.pool.connection() as conn, conn.transaction():
        current = await _visible_deer(conn, deer_id, principal, lock=True)
        if current["merged_into"] is not None:
            raise Problem(409, "deer-merged", f"deer {deer_id} was merged into {current['merged_into']}")
        assignments = ", ".join(f"{column} = %({column})s" for column in changes)  # names from the model only
        row = await (
            await conn.execute(
                f"UPDATE deer SET {assignments} WHERE id = %(id)s RETURNING {PROFILE_COLUMNS}",
                {**changes, "id": deer_id},
            )
        ).fetchone()
    assert row is not None  # locked FOR UPDATE above, so the UPDATE found it
    return dict(row)


@router.post("/api/deer/{deer_id}/merge", summary="Merge this profile into another of the same site")
async def merge_deer(deer_id: int, body: MergeIn, resources: ResourcesDep, principal: PrincipalDep) -> dict[str, Any]:
    """Moves every detection to ``into`` (decisions kept) and marks this profile merged; audited."""
    if body.into == deer_id:
        raise Problem(422, "merge-into-self", "a profile cannot be merged into itself")
    async with resources.pool.connection() as conn, conn.transaction():
        # Both rows locked in id order, as identification and review lock profiles: no deadlock between them.
        await conn.execute("SELECT id FROM deer WHERE id = ANY(%s) ORDER BY id FOR UPDATE", ([deer_id, body.into],))
        source = await _visible_deer(conn, deer_id, principal, lock=True)
        target = await _visible_deer(conn, body.into, principal, lock=True)
        if source["site_id"] != target["site_id"]:
            raise Problem(422, "merge-across-sites", "profiles of different sites cannot be merged")
        if source["merged_into"] is not None or target["merged_into"] is not None:
            raise Problem(409, "deer-merged", "one of the profiles was already merged")
        moved = await conn.execute("UPDATE detections SET deer_id = %s WHERE deer_id = %s", (body.into, deer_id))
        await conn.execute("UPDATE deer SET merged_into = %s WHERE id = %s", (body.into, deer_id))
        await conn.execute(
            "INSERT INTO review_events (site_id, deer_id, action, from_deer_id, to_deer_id, api_key_id, actor, note)"
            " VALUES (%s, %s, 'merge', %s, %s, %s, %s, %s)",
            (
                source["site_id"],
                body.into,
                deer_id,
                body.into,
                principal.key_id,
                f"api-key:{principal.key_id}",
                body.note,
            ),
        )
    return {"deer_id": deer_id, "merged_into": body.into, "detections_moved": moved.rowcount}
