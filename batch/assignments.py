"""Re-decide automatic assignments from new scores (``--apply-assignments``); a person's decisions are never touched.

A detection a person decided (assigned, gave a new deer, or unassigned: ``reviewed_at`` is set, or the
decision is ``manual``) keeps that decision. An assignment never lands on a profile merged away after
the run's galleries were loaded: the target profiles are locked FOR SHARE (the merge locks them FOR
UPDATE) and followed to the profile that survived. Every change of deer or decision is recorded in
review_events as ``auto_reassign`` by the run (serve_app/store/audit.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

import psycopg
from psycopg.rows import TupleRow

from batch.results import Scored
from serve_app.reid.decision import Thresholds
from serve_app.store.audit import Reassignment, record_reassignments

UNDECIDED = "d.decision <> 'manual' AND d.reviewed_at IS NULL"
"""Detections no person has decided: the only ones an automatic pass may change."""

LOCK_DEER_SQL = "SELECT id, merged_into FROM deer WHERE id = ANY(%s) ORDER BY id FOR SHARE"
LOCK_SQL = f"""
SELECT d.id, d.deer_id, d.decision FROM detections d
WHERE d.id = ANY(%s) AND {UNDECIDED}
ORDER BY d.id FOR UPDATE
"""
UPDATE_SQL = f"""
UPDATE detections AS d SET deer_id = u.deer_id, decision = u.decision, top1_similarity = u.top1,
                           model_version = coalesce(%s, d.model_version),
                           -- the stored embedding keeps naming the model that made it (SET reads the old row)
                           embedding_model_version = coalesce(d.embedding_model_version, d.model_version)
FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::float8[]) AS u(id, deer_id, decision, top1)
WHERE d.id = u.id AND {UNDECIDED}
"""


def surviving_profiles(cur: psycopg.Cursor[TupleRow], deer_ids: Iterable[int]) -> dict[int, int]:
    """Each profile's survivor (itself unless merged), every profile on the way locked FOR SHARE until commit."""
    merged_into: dict[int, int | None] = {}
    pending = set(deer_ids)
    while pending:
        for deer_id, into in cur.execute(LOCK_DEER_SQL, (sorted(pending),)).fetchall():
            merged_into[deer_id] = into
        pending = {into for into in merged_into.values() if into is not None and into not in merged_into}
    survivors: dict[int, int] = {}
    for deer_id in merged_into:
        survivor, seen = deer_id, {deer_id}
        while (into := merged_into.get(survivor)) is not None and into not in seen:
            survivor = into
            seen.add(into)
        survivors[deer_id] = survivor
    return survivors


def apply_assignments(
    cur: psycopg.Cursor[TupleRow],
    results: Sequence[Scored],
    *,
    thresholds: Thresholds,
    run_id: uuid.UUID,
    model_version: str | None = None,
) -> int:
    """Update the undecided detections among ``results``; returns how many changed deer or decision.

    Each one re-decided carries ``model_version`` (the run's model) from now on; None leaves the column as it is.
    """
    by_id = {r.detection_id: r for r in results if r.deer_ids}
    if not by_id:
        return 0
    decided = {det_id: result.decision(thresholds) for det_id, result in by_id.items()}
    # Profiles before detections, the merge's order: the two never wait for each other in a cycle.
    survivor = surviving_profiles(cur, {deer for _, deer in decided.values() if deer is not None})
    current = {row[0]: (row[1], row[2]) for row in cur.execute(LOCK_SQL, (list(by_id),)).fetchall()}
    ids, deer, decisions, top1s = [], [], [], []
    changed: list[Reassignment] = []
    for det_id, (old_deer, old_decision) in current.items():
        decision, new_deer = decided[det_id]
        new_deer = survivor.get(new_deer, new_deer) if new_deer is not None else None
        top = by_id[det_id].top1()
        ids.append(det_id)
        deer.append(new_deer)
        decisions.append(decision)
        top1s.append(top[1] if top else None)
        if new_deer != old_deer or decision != old_decision:
            changed.append(Reassignment(det_id, old_deer, new_deer, old_decision, decision))
    cur.execute(UPDATE_SQL, (model_version, ids, deer, decisions, top1s))
    note = f"re-decided at accept threshold {thresholds.accept}"
    record_reassignments(cur, changed, actor=f"backfill:{run_id}", note=note)
    return len(changed)
