"""Re-decide automatic assignments from new scores (``--apply-assignments``); manual ones are never touched.

Every change of deer or decision is recorded in review_events as ``auto_reassign`` by the run.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from batch.results import Scored
from serve_app.reid.decision import Thresholds

LOCK_SQL = """
SELECT id, deer_id, decision FROM detections
WHERE id = ANY(%s) AND decision <> 'manual'
ORDER BY id FOR UPDATE
"""
UPDATE_SQL = """
UPDATE detections AS d SET deer_id = u.deer_id, decision = u.decision, top1_similarity = u.top1,
                           model_version = coalesce(%s, d.model_version)
FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::float8[]) AS u(id, deer_id, decision, top1)
WHERE d.id = u.id AND d.decision <> 'manual'
"""
EVENTS_SQL = """
INSERT INTO review_events (detection_id, deer_id, action, from_deer_id, to_deer_id, from_decision, to_decision,
                           actor, note)
SELECT u.id, u.to_deer, 'auto_reassign', u.from_deer, u.to_deer, u.from_decision, u.to_decision, %s, %s
FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[])
     AS u(id, from_deer, to_deer, from_decision, to_decision)
"""


def apply_assignments(
    cur: psycopg.Cursor[Any],
    results: Sequence[Scored],
    *,
    thresholds: Thresholds,
    run_id: uuid.UUID,
    model_version: str | None = None,
) -> int:
    """Update the non-manual detections among ``results``; returns how many changed deer or decision.

    Each one re-decided carries ``model_version`` (the run's model) from now on; None leaves the column as it is.
    """
    by_id = {r.detection_id: r for r in results if r.deer_ids}
    if not by_id:
        return 0
    current = {row[0]: (row[1], row[2]) for row in cur.execute(LOCK_SQL, (list(by_id),)).fetchall()}
    ids, deer, decisions, top1s = [], [], [], []
    changed: list[tuple[int, int | None, int | None, str, str]] = []
    for det_id, (old_deer, old_decision) in current.items():
        result = by_id[det_id]
        decision, new_deer = result.decision(thresholds)
        top = result.top1()
        ids.append(det_id)
        deer.append(new_deer)
        decisions.append(decision)
        top1s.append(top[1] if top else None)
        if new_deer != old_deer or decision != old_decision:
            changed.append((det_id, old_deer, new_deer, old_decision, decision))
    cur.execute(UPDATE_SQL, (model_version, ids, deer, decisions, top1s))
    if changed:
        columns = list(zip(*changed, strict=True))
        cur.execute(
            EVENTS_SQL,
            (f"backfill:{run_id}", f"re-decided at accept threshold {thresholds.accept}", *map(list, columns)),
        )
    return len(changed)
