"""Write one block of backfill results in one transaction: scores (binary COPY), embeddings, assignments.

Idempotent per (run, detection, profile): rows are COPYed into a temporary table and inserted with
ON CONFLICT DO NOTHING against the run's unique index, so a block written twice (a retried task,
a resumed run racing a dying one) adds nothing the second time.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from batch.assignments import apply_assignments
from batch.results import Scored
from batch.runs import PROGRESS_SQL
from serve_app.reid.decision import Thresholds
from serve_app.reid.scores import COLUMNS, encode_binary
from serve_app.store.galleries import STORE_EMBEDDINGS_SQL

_COLS = ", ".join(COLUMNS)
STAGE_SQL = (
    "CREATE TEMP TABLE IF NOT EXISTS backfill_scores_in ON COMMIT DELETE ROWS"
    f" AS SELECT {_COLS} FROM reid_similarity_scores WITH NO DATA"
)
STAGE_COPY_SQL = f"COPY backfill_scores_in ({_COLS}) FROM STDIN (FORMAT BINARY)"
INSERT_SQL = f"""
INSERT INTO reid_similarity_scores ({_COLS}) SELECT {_COLS} FROM backfill_scores_in
ON CONFLICT (run_id, detection_id, deer_id) WHERE run_id IS NOT NULL DO NOTHING
RETURNING detection_id
"""


@dataclass
class BlockCounts:
    """What one block (or a whole run, summed) wrote."""

    detections: int = 0
    score_rows: int = 0
    failed: int = 0
    reassigned: int = 0

    def add(self, other: BlockCounts) -> None:
        """Sum another block's counts into this one."""
        self.detections += other.detections
        self.score_rows += other.score_rows
        self.failed += other.failed
        self.reassigned += other.reassigned


def write_block(
    conn: psycopg.Connection[Any],
    results: Sequence[Scored],
    *,
    run_id: uuid.UUID,
    model_version: str,
    thresholds: Thresholds,
    store_embeddings: bool,
    assign: bool,
) -> BlockCounts:
    """Write a block and advance the run's counters, all in one transaction."""
    ok = [r for r in results if r.error is None]
    rows = [row for r in ok for row in r.rows(thresholds=thresholds, model_version=model_version, run_id=run_id)]
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(STAGE_SQL)
        if rows:
            with cur.copy(STAGE_COPY_SQL) as copy:
                copy.write(encode_binary(rows))
        inserted = [r[0] for r in cur.execute(INSERT_SQL).fetchall()] if rows else []
        fresh = set(inserted)
        # A detection counts as done once; one whose rows were all present already was done before.
        new_done = sum(1 for r in ok if not r.deer_ids or r.detection_id in fresh)
        if store_embeddings:
            stored = [r for r in ok if r.embedding is not None]
            cur.execute(
                STORE_EMBEDDINGS_SQL,
                (model_version, [r.detection_id for r in stored], [r.embedding for r in stored]),
            )
        reassigned = (
            apply_assignments(cur, ok, thresholds=thresholds, run_id=run_id, model_version=model_version)
            if assign
            else 0
        )
        cur.execute(
            PROGRESS_SQL,
            {"done": new_done, "failed": len(results) - len(ok), "rows": len(inserted), "run_id": run_id},
        )
    return BlockCounts(
        detections=new_done, score_rows=len(inserted), failed=len(results) - len(ok), reassigned=reassigned
    )
