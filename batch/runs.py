"""Backfill runs: options, the detection selection (one place builds its SQL), and backfill_runs rows.

A run fixes its selection when it starts (filters plus the id bounds of the matching detections),
so a resumed run reads exactly the detections of the original selection that have no rows yet.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import psycopg

from serve_app.errors import TrailcamError
from serve_app.reid.decision import DEFAULT_ACCEPT_THRESHOLD, Thresholds
from serve_app.reid.model_spec import ModelSpec

Mode = Literal["missing", "all"]
Decode = Literal["exact", "draft", "gpu"]
MAX_ID = 2**63 - 1


class RunLocked(TrailcamError):
    """Another driver holds the run: it is being resumed (or still run) by another process."""


@dataclass(frozen=True)
class BackfillOptions:
    """Everything that defines a run; stored as the run's parameters."""

    architecture: str = "resnet50"
    weights: str = "random"
    seed: int = 7
    input_size_px: int = 224
    batch_size: int = 64
    sites: tuple[int, ...] | None = None
    since: str | None = None
    until: str | None = None
    limit: int | None = None
    mode: Mode = "missing"
    decode: Decode = "exact"
    accept_threshold: float = DEFAULT_ACCEPT_THRESHOLD
    review_threshold: float | None = None
    store_embeddings: bool = False
    apply_assignments: bool = False
    rows_per_block: int = 256

    @property
    def spec(self) -> ModelSpec:
        """The model to run."""
        return ModelSpec(
            architecture=self.architecture, weights=self.weights, seed=self.seed, input_size_px=self.input_size_px
        )

    @property
    def thresholds(self) -> Thresholds:
        """The decision rule's thresholds."""
        return Thresholds(accept=self.accept_threshold, review=self.review_threshold)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready parameters."""
        data = dataclasses.asdict(self)
        data["sites"] = list(self.sites) if self.sites is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackfillOptions:
        """Options from stored parameters (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if values.get("sites") is not None:
            values["sites"] = tuple(values["sites"])
        return cls(**values)


@dataclass(frozen=True)
class Selection:
    """The detections a run covers: filters, model version and id bounds fixed at start."""

    model_version: str
    run_id: uuid.UUID | None
    mode: Mode
    sites: tuple[int, ...] | None
    since: str | None
    until: str | None
    id_min: int = 0
    id_max: int = MAX_ID
    scored_before: dt.datetime | None = None
    """Only score rows computed before this count as already there (a run's plan sets it to the database's clock
    when it plans): what a range reads then stays the same while the run writes, so a read task Ray runs again
    reads the rows it read the first time, and skips none of them."""

    def params(self, *, lo: int | None = None, hi: int | None = None) -> dict[str, Any]:
        """Bind values for the selection SQL, optionally narrowed to ids lo..hi."""
        return {
            "lo": max(self.id_min, lo if lo is not None else self.id_min),
            "hi": min(self.id_max, hi if hi is not None else self.id_max),
            "sites": list(self.sites) if self.sites is not None else None,
            "since": _timestamp(self.since),
            "until": _timestamp(self.until),
            "missing_only": self.mode == "missing",
            "model_version": self.model_version,
            "run_id": self.run_id,
            "scored_before": self.scored_before,
        }


def _timestamp(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


SELECTION_FROM = """
FROM detections d
JOIN images i ON i.id = d.image_id
JOIN cameras c ON c.id = i.camera_id
WHERE d.id BETWEEN %(lo)s AND %(hi)s
  AND (%(sites)s::bigint[] IS NULL OR c.site_id = ANY(%(sites)s::bigint[]))
  AND (%(since)s::timestamptz IS NULL OR i.captured_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR i.captured_at < %(until)s::timestamptz)
  AND (NOT %(missing_only)s OR NOT EXISTS (
        SELECT 1 FROM reid_similarity_scores s
        WHERE s.detection_id = d.id AND s.model_version = %(model_version)s
          AND (%(scored_before)s::timestamptz IS NULL OR s.computed_at < %(scored_before)s::timestamptz)))
  AND (%(run_id)s::uuid IS NULL OR NOT EXISTS (
        SELECT 1 FROM reid_similarity_scores s WHERE s.run_id = %(run_id)s::uuid AND s.detection_id = d.id
          AND (%(scored_before)s::timestamptz IS NULL OR s.computed_at < %(scored_before)s::timestamptz)))
"""
READ_SQL = (
    "SELECT d.id AS detection_id, c.site_id, i.uri, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h"
    + SELECTION_FROM
    + "ORDER BY d.id"
)
BOUNDS_SQL = "SELECT min(d.id) AS lo, max(d.id) AS hi, count(*) AS n" + SELECTION_FROM
LIMITED_BOUNDS_SQL = (
    "SELECT min(id) AS lo, max(id) AS hi, count(*) AS n FROM (SELECT d.id"
    + SELECTION_FROM
    + "ORDER BY d.id LIMIT %(limit)s) t"
)
SITES_SQL = "SELECT DISTINCT c.site_id" + SELECTION_FROM


def database_now(conn: psycopg.Connection[Any]) -> dt.datetime:
    """The database's clock now (not the transaction's start)."""
    row = conn.execute("SELECT clock_timestamp() AS now").fetchone()
    assert row is not None
    now: dt.datetime = row["now"]
    return now


def bounds(conn: psycopg.Connection[Any], selection: Selection, *, limit: int | None) -> tuple[int, int, int]:
    """(first id, last id, count) of the selection; (0, -1, 0) when empty."""
    if limit is not None:
        row = conn.execute(LIMITED_BOUNDS_SQL, {**selection.params(), "limit": limit}).fetchone()
    else:
        row = conn.execute(BOUNDS_SQL, selection.params()).fetchone()
    assert row is not None
    if not row["n"]:
        return 0, -1, 0
    return int(row["lo"]), int(row["hi"]), int(row["n"])


def selection_sites(conn: psycopg.Connection[Any], selection: Selection) -> list[int]:
    """The sites the selection touches."""
    return sorted(int(r["site_id"]) for r in conn.execute(SITES_SQL, selection.params()))


def id_ranges(lo: int, hi: int, *, total: int, rows_per_block: int) -> list[tuple[int, int]]:
    """Split ids lo..hi into contiguous ranges holding about ``rows_per_block`` detections each."""
    if total <= 0 or hi < lo:
        return []
    blocks = max(1, -(-total // rows_per_block))
    step = max(1, -(-(hi - lo + 1) // blocks))
    return [(start, min(hi, start + step - 1)) for start in range(lo, hi + 1, step)]


def create_run(
    conn: psycopg.Connection[Any], *, run_id: uuid.UUID, model_version: str, parameters: dict[str, Any], total: int
) -> None:
    """Insert the run's row (state running)."""
    conn.execute(
        "INSERT INTO backfill_runs (id, model_version, parameters, total) VALUES (%s, %s, %s, %s)",
        (run_id, model_version, json.dumps(parameters), total),
    )
    conn.commit()


def load_run(conn: psycopg.Connection[Any], run_id: uuid.UUID) -> dict[str, Any] | None:
    """A run's row."""
    return conn.execute("SELECT * FROM backfill_runs WHERE id = %s", (run_id,)).fetchone()


def mark_resumed(conn: psycopg.Connection[Any], run_id: uuid.UUID) -> None:
    """Back to running after an interruption, counters recounted from the run's rows.

    The resume reads every detection of the run that has no rows again (failed ones included), so
    ``failed`` starts from zero and ``done`` from the detections that have rows: nothing counts twice.
    The row lock first: a block of a dying driver that commits now is counted before or after, not lost.
    """
    conn.execute("SELECT id FROM backfill_runs WHERE id = %s FOR UPDATE", (run_id,))
    conn.execute(
        "UPDATE backfill_runs SET state = 'running', error = NULL, finished_at = NULL, updated_at = now(), failed = 0,"
        " done = (SELECT count(DISTINCT detection_id) FROM reid_similarity_scores WHERE run_id = %(id)s),"
        " score_rows = (SELECT count(*) FROM reid_similarity_scores WHERE run_id = %(id)s) WHERE id = %(id)s",
        {"id": run_id},
    )
    conn.commit()


def finish_run(conn: psycopg.Connection[Any], run_id: uuid.UUID, *, state: str, error: str | None = None) -> None:
    """Final state; the score row count is recounted from the table."""
    conn.execute(
        "UPDATE backfill_runs SET state = %s, error = %s, finished_at = now(), updated_at = now(),"
        " score_rows = (SELECT count(*) FROM reid_similarity_scores WHERE run_id = %s) WHERE id = %s",
        (state, error, run_id, run_id),
    )
    conn.commit()


PROGRESS_SQL = """
UPDATE backfill_runs SET done = done + %(done)s, failed = failed + %(failed)s,
       score_rows = score_rows + %(rows)s, updated_at = now()
WHERE id = %(run_id)s
"""


def try_lock_run(conn: psycopg.Connection[Any], run_id: uuid.UUID) -> bool:
    """A session lock on the run: one driver per run at a time (released when the driver's session ends)."""
    row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS ok", (str(run_id),)).fetchone()
    conn.commit()
    return bool(row and row["ok"])
