"""Deer profiles: list, read with recent sightings, edit, merge, create.

``sites`` is the caller's site filter (``Principal.site_filter()``: None means every site); a profile of
another site is answered as :class:`NotFound`, exactly like one that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import TypedDict, cast

from serve_app.errors import DeerMerged, MergeAcrossSites, NotFound
from serve_app.store.audit import ReviewEvent, key_actor, record_event
from serve_app.store.db import AsyncConn, Pool, SyncConn

# A profile's picture, its best detection: a person's decision first, then the detector's confidence, then the
# newest. The deer list, a profile and the review queue's candidates all show it; migration 011's
# detections_profile_picture_idx follows this ORDER BY column for column. ``{deer_id}`` is the outer query's
# profile id column.
BEST_DETECTION_SQL = """(SELECT g.id FROM detections g WHERE g.deer_id = {deer_id}
        ORDER BY (g.decision = 'manual') DESC, g.confidence DESC NULLS LAST, g.created_at DESC, g.id DESC LIMIT 1)"""
# A profile's figures from its detections.
FIGURES_SQL = f"""
       (SELECT count(*) FROM detections d WHERE d.deer_id = e.id) AS sightings,
       (SELECT max(i.captured_at) FROM detections d JOIN images i ON i.id = d.image_id WHERE d.deer_id = e.id)
           AS last_seen,
       {BEST_DETECTION_SQL.format(deer_id="e.id")} AS best_detection_id"""
LIST_SQL = f"""
SELECT e.id, e.site_id, e.name, e.sex, e.created_at, {FIGURES_SQL}
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
STATS_SQL = f"SELECT {FIGURES_SQL} FROM deer e WHERE e.id = %s"
# Sightings per UTC week (weeks start on Monday), for the profile's chart.
WEEKLY_SQL = """
SELECT (date_trunc('week', i.captured_at AT TIME ZONE 'UTC'))::date AS week_start, count(*) AS sightings
FROM detections d JOIN images i ON i.id = d.image_id
WHERE d.deer_id = %s GROUP BY 1 ORDER BY 1 DESC LIMIT %s
"""
WEEKS_KEPT = 104
"""Most weeks of sightings a profile answers (the newest with any sighting)."""
PROFILE_COLUMNS = "id, site_id, name, sex, notes, created_at, merged_into"
PROFILE_SQL = f"SELECT {PROFILE_COLUMNS} FROM deer WHERE id = %s"
# Both rows locked in id order, as identification and review lock profiles: no deadlock between them.
LOCK_PAIR_SQL = "SELECT id FROM deer WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
MOVE_DETECTIONS_SQL = "UPDATE detections SET deer_id = %s WHERE deer_id = %s"
MARK_MERGED_SQL = "UPDATE deer SET merged_into = %s WHERE id = %s"
INSERT_DEER_SQL = "INSERT INTO deer (site_id, name, sex, notes) VALUES (%s, %s, %s, %s) RETURNING id"
EDITABLE = ("name", "sex", "notes")
"""The profile columns an edit may change."""


class DeerSummary(TypedDict):
    """An active profile as the list shows it."""

    id: int
    site_id: int
    name: str
    sex: str | None
    created_at: datetime
    sightings: int
    last_seen: datetime | None
    best_detection_id: int | None


class Profile(TypedDict):
    """One profile's own columns."""

    id: int
    site_id: int
    name: str
    sex: str | None
    notes: str | None
    created_at: datetime
    merged_into: int | None


class ProfileStats(TypedDict):
    """What a profile's detections say about it: how many, the newest capture, the one that pictures it."""

    sightings: int
    last_seen: datetime | None
    best_detection_id: int | None


class WeekCount(TypedDict):
    """Sightings in one UTC week (Monday to Sunday)."""

    week_start: date
    sightings: int


class Sighting(TypedDict):
    """A detection of the profile with its image."""

    detection_id: int
    decision: str
    top1_similarity: float | None
    image_uri: str
    captured_at: datetime
    camera_id: int


class ProfileDetail(TypedDict):
    """A profile as one page shows it: its columns, its figures, its newest sightings and its weekly counts."""

    profile: Profile
    stats: ProfileStats
    recent: list[Sighting]
    weekly: list[WeekCount]


def _visible(sites: list[int] | None, site_id: int) -> bool:
    return sites is None or site_id in sites


async def _profile(conn: AsyncConn, deer_id: int, sites: list[int] | None, *, lock: bool = False) -> Profile:
    row = await (await conn.execute(PROFILE_SQL + (" FOR UPDATE" if lock else ""), (deer_id,))).fetchone()
    if row is None or not _visible(sites, int(row["site_id"])):
        raise NotFound(f"deer {deer_id} not found")
    return cast(Profile, row)


async def list_deer(
    pool: Pool, *, sites: list[int] | None, site_id: int | None, limit: int, offset: int
) -> list[DeerSummary]:
    """Active (not merged) profiles of ``sites`` (and of ``site_id`` when given) with their sighting counts."""
    params = {"sites": sites, "site": site_id, "limit": limit, "offset": offset}
    async with pool.connection() as conn:
        rows = await (await conn.execute(LIST_SQL, params)).fetchall()
    return cast(list[DeerSummary], rows)


async def profile_with_sightings(pool: Pool, *, deer_id: int, sites: list[int] | None, sightings: int) -> ProfileDetail:
    """The profile, its figures, its ``sightings`` newest detections and its sightings per week (the newest
    :data:`WEEKS_KEPT` weeks with any); NotFound when ``sites`` do not hold it."""
    async with pool.connection() as conn:
        profile = await _profile(conn, deer_id, sites)
        stats = await (await conn.execute(STATS_SQL, (deer_id,))).fetchone()
        recent = await (await conn.execute(SIGHTINGS_SQL, (deer_id, sightings))).fetchall()
        weekly = await (await conn.execute(WEEKLY_SQL, (deer_id, WEEKS_KEPT))).fetchall()
    assert stats is not None  # the profile's row was just read
    return ProfileDetail(
        profile=profile,
        stats=cast(ProfileStats, stats),
        recent=cast(list[Sighting], recent),
        weekly=cast(list[WeekCount], weekly[::-1]),
    )


async def update_deer(
    pool: Pool, *, deer_id: int, sites: list[int] | None, changes: Mapping[str, str | None]
) -> Profile:
    """Set the columns ``changes`` names (some of :data:`EDITABLE`) in one transaction; answers the profile.

    NotFound when ``sites`` do not hold it; DeerMerged when it was merged away (a merged profile is read-only).
    """
    unknown = set(changes) - set(EDITABLE)
    if unknown or not changes:
        raise ValueError(f"an edit changes some of {', '.join(EDITABLE)}, got {sorted(changes)}")
    assignments = ", ".join(f"{column} = %({column})s" for column in changes)  # names checked against EDITABLE
    async with pool.connection() as conn, conn.transaction():
        current = await _profile(conn, deer_id, sites, lock=True)
        if current["merged_into"] is not None:
            raise DeerMerged(f"deer {deer_id} was merged into {current['merged_into']}")
        row = await (
            await conn.execute(
                f"UPDATE deer SET {assignments} WHERE id = %(id)s RETURNING {PROFILE_COLUMNS}",
                {**changes, "id": deer_id},
            )
        ).fetchone()
    assert row is not None  # locked FOR UPDATE above, so the UPDATE found it
    return cast(Profile, row)


async def merge_deer(
    pool: Pool, *, deer_id: int, into: int, sites: list[int] | None, key_id: int, note: str | None
) -> int:
    """Move every detection of ``deer_id`` to ``into`` (decisions kept), mark it merged and audit the merge, in
    one transaction; returns how many detections moved.

    NotFound when ``sites`` do not hold either profile; MergeAcrossSites when their sites differ; DeerMerged
    when either was merged already.
    """
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(LOCK_PAIR_SQL, ([deer_id, into],))
        source = await _profile(conn, deer_id, sites, lock=True)
        target = await _profile(conn, into, sites, lock=True)
        if source["site_id"] != target["site_id"]:
            raise MergeAcrossSites()
        if source["merged_into"] is not None or target["merged_into"] is not None:
            raise DeerMerged("one of the profiles was already merged")
        moved = await conn.execute(MOVE_DETECTIONS_SQL, (into, deer_id))
        await conn.execute(MARK_MERGED_SQL, (into, deer_id))
        event = ReviewEvent(
            action="merge",
            actor=key_actor(key_id),
            site_id=source["site_id"],
            deer_id=into,
            from_deer_id=deer_id,
            to_deer_id=into,
            api_key_id=key_id,
            note=note,
        )
        await record_event(conn, event)
    return moved.rowcount


async def create_deer(
    conn: AsyncConn, *, site_id: int, name: str, sex: str | None = None, notes: str | None = None
) -> int:
    """A new profile's id; runs in the caller's transaction (the assignment that names it)."""
    row = await (await conn.execute(INSERT_DEER_SQL, (site_id, name, sex, notes))).fetchone()
    assert row is not None  # INSERT ... RETURNING returns its row
    return int(row["id"])


def create_deer_sync(
    conn: SyncConn, *, site_id: int, name: str, sex: str | None = None, notes: str | None = None
) -> int:
    """:func:`create_deer` for batch jobs: a new profile's id, in the caller's transaction."""
    row = conn.execute(INSERT_DEER_SQL, (site_id, name, sex, notes)).fetchone()
    assert row is not None  # INSERT ... RETURNING returns its row
    return int(row["id"])
