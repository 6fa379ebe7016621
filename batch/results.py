"""One scored detection as it leaves the embedding stage, and its score rows (plain Python)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from serve_app.reid.decision import Decision, Thresholds, decide
from serve_app.reid.scores import ScoreRow, score_rows

RESULT_SCHEMA = pa.schema(
    [
        ("detection_id", pa.int64()),
        ("site_id", pa.int64()),
        ("deer_ids", pa.list_(pa.int64())),
        ("similarities", pa.list_(pa.float32())),
        ("embedding", pa.binary()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class Scored:
    """A detection's similarities to every profile of its site (empty when it failed or the site has none)."""

    detection_id: int
    site_id: int
    deer_ids: list[int]
    similarities: np.ndarray
    embedding: bytes | None = None
    error: str | None = None

    def top1(self) -> tuple[int, float] | None:
        """(deer id, similarity) of the best profile."""
        if not self.deer_ids:
            return None
        best = int(np.argmax(self.similarities))
        return self.deer_ids[best], float(self.similarities[best])

    def decision(self, thresholds: Thresholds) -> tuple[Decision, int | None]:
        """The rule's decision and the deer it assigns (only for ``auto``)."""
        top = self.top1()
        decision = decide(top[1] if top else None, thresholds)
        return decision, (top[0] if top and decision == "auto" else None)

    def rows(self, *, thresholds: Thresholds, model_version: str, run_id: uuid.UUID | None) -> list[ScoreRow]:
        """The score rows, exactly as the online path builds them."""
        if not self.deer_ids:
            return []
        _, assigned = self.decision(thresholds)
        return score_rows(
            self.detection_id,
            deer_ids=self.deer_ids,
            similarities=self.similarities,
            threshold=thresholds.accept,
            assigned_deer_id=assigned,
            model_version=model_version,
            source="backfill",
            run_id=run_id,
        )


def to_table(items: list[Scored]) -> pa.Table:
    """Results as one Arrow table (the block format between the embedding stage and the sink)."""
    return pa.table(
        {
            "detection_id": [s.detection_id for s in items],
            "site_id": [s.site_id for s in items],
            "deer_ids": [s.deer_ids for s in items],
            "similarities": [np.asarray(s.similarities, dtype=np.float32) for s in items],
            "embedding": [s.embedding for s in items],
            "error": [s.error for s in items],
        },
        schema=RESULT_SCHEMA,
    )


def from_table(table: Any) -> Iterator[Scored]:
    """Results back from an Arrow table."""
    columns = {name: table.column(name).to_pylist() for name in RESULT_SCHEMA.names}
    for i in range(table.num_rows):
        yield Scored(
            detection_id=columns["detection_id"][i],
            site_id=columns["site_id"][i],
            deer_ids=columns["deer_ids"][i] or [],
            similarities=np.asarray(columns["similarities"][i] or [], dtype=np.float32),
            embedding=columns["embedding"][i],
            error=columns["error"][i],
        )
