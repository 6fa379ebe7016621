"""review_events: the audit trail of every change of a detection's deer or decision, and of every merge.

Each writer composes its event into its own transaction: these functions take the caller's connection
(or cursor) and never commit. A row names the detection or deer it is about; the site comes from them
(the ``review_events_site`` trigger) unless the writer gives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import psycopg
from psycopg.rows import TupleRow

from serve_app.store.db import AsyncConn

Action = Literal["assign", "unassign", "new_deer", "merge", "auto_reassign"]

INSERT_EVENT_SQL = """
INSERT INTO review_events (site_id, detection_id, deer_id, action, from_deer_id, to_deer_id, from_decision,
                           to_decision, api_key_id, actor, note)
VALUES (%(site_id)s, %(detection_id)s, %(deer_id)s, %(action)s, %(from_deer_id)s, %(to_deer_id)s,
        %(from_decision)s, %(to_decision)s, %(api_key_id)s, %(actor)s, %(note)s)
"""
AUTO_REASSIGN_SQL = """
INSERT INTO review_events (detection_id, deer_id, action, from_deer_id, to_deer_id, from_decision, to_decision,
                           actor, note)
SELECT u.id, u.to_deer, 'auto_reassign', u.from_deer, u.to_deer, u.from_decision, u.to_decision, %s, %s
FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[])
     AS u(id, from_deer, to_deer, from_decision, to_decision)
"""


def key_actor(key_id: int) -> str:
    """The actor recorded for a change made with an API key."""
    return f"api-key:{key_id}"


@dataclass(frozen=True)
class ReviewEvent:
    """One audit row; fields left None stay NULL (``site_id`` is then taken from the detection or deer)."""

    action: Action
    actor: str
    site_id: int | None = None
    detection_id: int | None = None
    deer_id: int | None = None
    from_deer_id: int | None = None
    to_deer_id: int | None = None
    from_decision: str | None = None
    to_decision: str | None = None
    api_key_id: int | None = None
    note: str | None = None


@dataclass(frozen=True)
class Reassignment:
    """An automatic pass's change of one detection's deer or decision."""

    detection_id: int
    from_deer_id: int | None
    to_deer_id: int | None
    from_decision: str
    to_decision: str


async def record_event(conn: AsyncConn, event: ReviewEvent) -> None:
    """Write one event in the caller's transaction (it commits with the change it records)."""
    await conn.execute(INSERT_EVENT_SQL, asdict(event))


def record_reassignments(
    cur: psycopg.Cursor[TupleRow], changes: Sequence[Reassignment], *, actor: str, note: str | None
) -> None:
    """Write one ``auto_reassign`` event per change in one statement, in the batch writer's transaction."""
    if not changes:
        return
    columns = (
        [c.detection_id for c in changes],
        [c.from_deer_id for c in changes],
        [c.to_deer_id for c in changes],
        [c.from_decision for c in changes],
        [c.to_decision for c in changes],
    )
    cur.execute(AUTO_REASSIGN_SQL, (actor, note, *columns))
