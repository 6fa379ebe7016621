"""The similarity log: one ScoreRow per detection x profile, written with binary COPY.

``copy_scores`` (sync connection, batch jobs) and ``copy_scores_async`` (async connection) share one
COPY statement; :class:`serve_app.reid.score_buffer.ScoreBuffer` batches rows for the online path.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import psycopg

Source = Literal["online", "backfill"]

COLUMNS = (
    "detection_id",
    "deer_id",
    "similarity",
    "rank",
    "threshold",
    "matched",
    "model_version",
    "source",
    "run_id",
    "computed_at",
)
COPY_SQL = f"COPY reid_similarity_scores ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"
COPY_TYPES = ["int8", "int8", "float4", "int4", "float4", "bool", "text", "text", "uuid", "timestamptz"]


@dataclass(frozen=True, slots=True)
class ScoreRow:
    """One similarity of one detection against one deer profile."""

    detection_id: int
    deer_id: int
    similarity: float
    rank: int
    threshold: float
    matched: bool
    model_version: str
    source: Source = "online"
    run_id: uuid.UUID | None = None
    computed_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def as_tuple(self) -> tuple[Any, ...]:
        """Values in :data:`COLUMNS` order."""
        return (
            self.detection_id,
            self.deer_id,
            self.similarity,
            self.rank,
            self.threshold,
            self.matched,
            self.model_version,
            self.source,
            self.run_id,
            self.computed_at,
        )


def rank_order(similarities: np.ndarray) -> np.ndarray:
    """Profile indices best first (stable for ties)."""
    return np.argsort(-np.asarray(similarities, dtype=np.float64), kind="stable")


def score_rows(
    detection_id: int,
    *,
    deer_ids: Sequence[int],
    similarities: np.ndarray,
    threshold: float,
    assigned_deer_id: int | None,
    model_version: str,
    source: Source = "online",
    run_id: uuid.UUID | None = None,
) -> list[ScoreRow]:
    """Rows for one detection: ranks 1..K best first; ``matched`` marks the profile it was assigned to."""
    now = dt.datetime.now(dt.UTC)
    return [
        ScoreRow(
            detection_id=detection_id,
            deer_id=int(deer_ids[i]),
            similarity=float(similarities[i]),
            rank=rank,
            threshold=threshold,
            matched=assigned_deer_id is not None and int(deer_ids[i]) == assigned_deer_id,
            model_version=model_version,
            source=source,
            run_id=run_id,
            computed_at=now,
        )
        for rank, i in enumerate(rank_order(similarities), start=1)
    ]


def copy_scores(conn: psycopg.Connection[Any], rows: Sequence[ScoreRow]) -> int:
    """Write rows with binary COPY on a sync connection (the caller commits); returns the row count."""
    with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
        copy.set_types(COPY_TYPES)
        for row in rows:
            copy.write_row(row.as_tuple())
    return len(rows)


async def copy_scores_async(conn: psycopg.AsyncConnection[Any], rows: Sequence[ScoreRow]) -> int:
    """Write rows with binary COPY on an async connection (the caller commits); returns the row count."""
    async with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
        copy.set_types(COPY_TYPES)
        for row in rows:
            await copy.write_row(row.as_tuple())
    return len(rows)
