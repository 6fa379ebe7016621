"""The similarity log: one ScoreRow per detection x profile, written with binary COPY.

``copy_scores`` (sync connection, batch jobs) and ``copy_scores_async`` (async connection) share one
COPY statement; :class:`serve_app.reid.score_buffer.ScoreBuffer` batches rows for the online path, in chunks
recorded in ``score_log_chunks`` (``claim_chunk``) so that a retried chunk is written once.
"""

from __future__ import annotations

import datetime as dt
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import psycopg
from psycopg.rows import tuple_row

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
# On a conflict with a transaction still in flight, the INSERT waits for it: a chunk is claimed at most once.
CLAIM_CHUNK_SQL = "INSERT INTO score_log_chunks (id, rows) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING RETURNING id"
CHUNK_ROWS_SQL = "SELECT rows FROM score_log_chunks WHERE id = %s"
PRUNE_CHUNKS_SQL = "DELETE FROM score_log_chunks WHERE written_at < now() - make_interval(secs => %s)"
# The referenced rows that still exist, locked FOR KEY SHARE (as the reference check does) until commit.
LIVE_REFERENCES_SQL = (
    "WITH d AS (SELECT id FROM detections WHERE id = ANY(%(detections)s) ORDER BY id FOR KEY SHARE),"
    " e AS (SELECT id FROM deer WHERE id = ANY(%(deer)s) ORDER BY id FOR KEY SHARE)"
    " SELECT 'detection' AS noun, id FROM d UNION ALL SELECT 'deer', id FROM e"
)


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


# PostgreSQL binary COPY framing: signature, flags, header extension length; -1 field count ends it.
_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_TRAILER = struct.pack(">h", -1)
_PG_EPOCH_US = int(dt.datetime(2000, 1, 1, tzinfo=dt.UTC).timestamp()) * 1_000_000
_NULL = struct.pack(">i", -1)


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">i", len(data)) + data


def _tuple_dtype(middle_len: int) -> np.dtype[Any]:
    """One binary COPY tuple: field count, then (length, value) pairs; text/uuid fields are one blob."""
    return np.dtype(
        [
            ("fields", ">i2"), ("l_det", ">i4"), ("det", ">i8"), ("l_deer", ">i4"), ("deer", ">i8"),
            ("l_sim", ">i4"), ("sim", ">f4"), ("l_rank", ">i4"), ("rank", ">i4"), ("l_thr", ">i4"), ("thr", ">f4"),
            ("l_matched", ">i4"), ("matched", "u1"), ("middle", f"V{middle_len}"), ("l_ts", ">i4"), ("ts", ">i8"),
        ]
    )  # fmt: skip


def encode_binary(rows: Sequence[ScoreRow]) -> bytes:
    """Rows as one PostgreSQL binary COPY stream, built with numpy (far cheaper than write_row per row).

    model_version, source and run_id repeat within a batch, so each distinct combination is encoded
    once as a blob and rows are grouped by it.
    """
    groups: dict[tuple[str, str, uuid.UUID | None], list[ScoreRow]] = {}
    for row in rows:
        groups.setdefault((row.model_version, row.source, row.run_id), []).append(row)
    parts = [_HEADER]
    for (model_version, source, run_id), members in groups.items():
        run = _NULL if run_id is None else struct.pack(">i", 16) + run_id.bytes
        middle = _text(model_version) + _text(source) + run
        out = np.empty(len(members), dtype=_tuple_dtype(len(middle)))
        out["fields"] = len(COLUMNS)
        out["l_det"], out["l_deer"], out["l_sim"], out["l_rank"], out["l_thr"], out["l_matched"] = 8, 8, 4, 4, 4, 1
        out["l_ts"] = 8
        out["det"] = [r.detection_id for r in members]
        out["deer"] = [r.deer_id for r in members]
        out["sim"] = [r.similarity for r in members]
        out["rank"] = [r.rank for r in members]
        out["thr"] = [r.threshold for r in members]
        out["matched"] = [r.matched for r in members]
        out["middle"] = np.frombuffer(middle, dtype=f"V{len(middle)}")[0]
        # Rows of one identification share a timestamp: convert each distinct one once.
        stamps: dict[dt.datetime, int] = {}
        out["ts"] = [
            stamps.get(r.computed_at)
            or stamps.setdefault(r.computed_at, round(r.computed_at.timestamp() * 1_000_000) - _PG_EPOCH_US)
            for r in members
        ]
        parts.append(out.tobytes())
    parts.append(_TRAILER)
    return b"".join(parts)


def copy_scores(conn: psycopg.Connection[Any], rows: Sequence[ScoreRow]) -> int:
    """Write rows with binary COPY on a sync connection (the caller commits); returns the row count."""
    if not rows:
        return 0
    with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
        copy.write(encode_binary(rows))
    return len(rows)


async def copy_scores_async(conn: psycopg.AsyncConnection[Any], rows: Sequence[ScoreRow]) -> int:
    """Write rows with binary COPY on an async connection (the caller commits); returns the row count."""
    if not rows:
        return 0
    async with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
        await copy.write(encode_binary(rows))
    return len(rows)


async def claim_chunk(conn: psycopg.AsyncConnection[Any], *, chunk_id: uuid.UUID, rows: int) -> int | None:
    """Record a chunk as written by the open transaction; None, or the rows an earlier commit of it wrote."""
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(CLAIM_CHUNK_SQL, (chunk_id, rows))
    if await cur.fetchone() is not None:
        return None
    await cur.execute(CHUNK_ROWS_SQL, (chunk_id,))
    found = await cur.fetchone()
    return int(found[0]) if found is not None else 0


async def rows_with_live_references(conn: psycopg.AsyncConnection[Any], rows: Sequence[ScoreRow]) -> list[ScoreRow]:
    """The rows whose detection and deer still exist, those locked until commit (so the COPY cannot be refused)."""
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(
        LIVE_REFERENCES_SQL,
        {"detections": sorted({r.detection_id for r in rows}), "deer": sorted({r.deer_id for r in rows})},
    )
    live: dict[str, set[int]] = {"detection": set(), "deer": set()}
    for noun, ref_id in await cur.fetchall():
        live[str(noun)].add(int(ref_id))
    return [r for r in rows if r.detection_id in live["detection"] and r.deer_id in live["deer"]]


async def prune_chunks(conn: psycopg.AsyncConnection[Any], *, older_than_s: float) -> int:
    """Forget chunk ids older than ``older_than_s`` seconds (the caller commits); returns how many."""
    cur = await conn.execute(PRUNE_CHUNKS_SQL, (older_than_s,))
    return cur.rowcount
