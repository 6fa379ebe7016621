"""The backfill pipeline's task side: read a range's detections, decode their crops, write the results.

Every Ray worker that runs one of these imports this module, so it imports neither torch nor the model code
(a worker started for a task would otherwise spend seconds of CPU importing them before its first row).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from psycopg.rows import dict_row
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from batch.crops import UnreadableImage, image_path, load_crop
from batch.results import from_table
from batch.runs import READ_SQL, BackfillOptions, Selection
from batch.score_writer import BlockCounts, write_block
from serve_app.reid.preprocessing import BBox

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 5
WRITE_ROWS = 512
"""Detections a write task takes at least (but the last): one connection for them, still one transaction a block."""


def read_ranges(batch: Any, *, dsn: str, selection: Selection) -> pa.Table:
    """The detections (with image URI, bbox and site) of a batch of id ranges."""
    records: list[dict[str, Any]] = []
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        for lo, hi in zip(batch["lo"].tolist(), batch["hi"].tolist(), strict=True):
            records.extend(conn.execute(READ_SQL, selection.params(lo=lo, hi=hi)).fetchall())
    columns = ("detection_id", "site_id", "uri", "bbox_x", "bbox_y", "bbox_w", "bbox_h")
    types = (pa.int64(), pa.int64(), pa.string(), pa.float64(), pa.float64(), pa.float64(), pa.float64())
    return pa.table({c: pa.array([r[c] for r in records], type=t) for c, t in zip(columns, types, strict=True)})


def decode_crops(batch: Any, *, image_root: str, size_px: int, draft: bool) -> dict[str, Any]:
    """Decode and crop a batch of detections into uint8 model inputs; unreadable images carry an error."""
    root = Path(image_root)
    n = len(batch["detection_id"])
    crops = np.zeros((n, size_px, size_px, 3), dtype=np.uint8)
    errors: list[str] = [""] * n
    for i in range(n):
        bbox = BBox(*(float(batch[k][i]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")))
        try:
            crops[i] = load_crop(image_path(str(batch["uri"][i]), root=root), bbox, size_px=size_px, draft=draft)
        except (UnreadableImage, ValueError) as exc:
            errors[i] = str(exc)
            logger.warning("detection %d not scored: %s", int(batch["detection_id"][i]), exc)
    return {"detection_id": batch["detection_id"], "site_id": batch["site_id"], "crop": crops, "error": errors}


def read_files(batch: Any, *, image_root: str) -> pa.Table:
    """The image files' bytes of a batch of detections, for actors that decode them (``decode="gpu"``)."""
    root = Path(image_root)
    n = len(batch["detection_id"])
    blobs, errors = [b""] * n, [""] * n
    for i in range(n):
        uri = str(batch["uri"][i])
        try:
            blobs[i] = image_path(uri, root=root).read_bytes()
        except OSError as exc:  # UnreadableImage (refused URI) included
            errors[i] = str(exc) if isinstance(exc, UnreadableImage) else f"cannot read {Path(uri).name}: {exc}"
            logger.warning("detection %d not scored: %s", int(batch["detection_id"][i]), errors[i])
    columns = {k: batch[k] for k in ("detection_id", "site_id", "uri", "bbox_x", "bbox_y", "bbox_w", "bbox_h")}
    return pa.table({**columns, "data": pa.array(blobs, type=pa.binary()), "error": pa.array(errors, pa.string())})


def _read_in_chunks(batch: Any, *, dsn: str, selection: Selection, chunk: int) -> Iterator[dict[str, np.ndarray]]:
    """A batch of id ranges' detections, ``chunk`` at a time, as numpy columns."""
    table = read_ranges(batch, dsn=dsn, selection=selection)
    for start in range(0, table.num_rows, chunk):
        part = table.slice(start, chunk)
        yield {name: part.column(name).to_numpy(zero_copy_only=False) for name in part.column_names}


def read_and_decode(
    batch: Any, *, dsn: str, selection: Selection, image_root: str, size_px: int, draft: bool, chunk: int
) -> Iterator[dict[str, Any]]:
    """A batch of id ranges' detections, decoded and cropped, ``chunk`` detections per yielded batch."""
    for rows in _read_in_chunks(batch, dsn=dsn, selection=selection, chunk=chunk):
        yield decode_crops(rows, image_root=image_root, size_px=size_px, draft=draft)


def read_and_fetch(batch: Any, *, dsn: str, selection: Selection, image_root: str, chunk: int) -> Iterator[pa.Table]:
    """A batch of id ranges' detections with their files' bytes, ``chunk`` detections per yielded batch."""
    for rows in _read_in_chunks(batch, dsn=dsn, selection=selection, chunk=chunk):
        yield read_files(rows, image_root=image_root)


def _nonempty(blocks: Iterable[Block]) -> Iterator[BlockAccessor]:
    """The blocks that hold rows (an id range with nothing left to score can leave an empty one, without columns)."""
    for block in blocks:
        accessor = BlockAccessor.for_block(block)
        if accessor.num_rows():
            yield accessor


class ScoreSink(Datasink[dict[str, int]]):
    """Writes result blocks with binary COPY, one transaction per block; counts come back to the driver."""

    def __init__(self, *, dsn: str, run_id: uuid.UUID, model_version: str, options: BackfillOptions) -> None:
        self.dsn = dsn
        self.run_id = run_id
        self.model_version = model_version
        self.options = options
        self.counts = BlockCounts()

    @property
    def min_rows_per_write(self) -> int:
        """Several embedding batches per write task (Ray Data bundles them), not a task and connection each."""
        return WRITE_ROWS

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, int]:
        """Write every block of this task; each block commits on its own."""
        total = BlockCounts()
        with psycopg.connect(self.dsn) as conn:
            for block in _nonempty(blocks):
                results = list(from_table(block.to_arrow()))
                total.add(
                    write_block(
                        conn,
                        results,
                        run_id=self.run_id,
                        model_version=self.model_version,
                        thresholds=self.options.thresholds,
                        store_embeddings=self.options.store_embeddings,
                        assign=self.options.apply_assignments,
                    )
                )
        return asdict(total)

    def on_write_complete(self, write_result: WriteResult[dict[str, int]]) -> None:
        """Sum the tasks' counts (runs on the driver)."""
        for counts in write_result.write_returns:
            self.counts.add(BlockCounts(**counts))


class DryRunSink(Datasink[dict[str, Any]]):
    """Writes nothing: counts what a run would write and keeps a few sample rows."""

    def __init__(self, *, model_version: str, options: BackfillOptions) -> None:
        self.model_version = model_version
        self.options = options
        self.summary: dict[str, Any] = {"detections": 0, "score_rows": 0, "failed": 0, "decisions": {}, "sample": []}

    @property
    def min_rows_per_write(self) -> int:
        """Several embedding batches per write task (Ray Data bundles them), not a task and connection each."""
        return WRITE_ROWS

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        """Count rows and decisions of this task's blocks."""
        out: dict[str, Any] = {"detections": 0, "score_rows": 0, "failed": 0, "decisions": {}, "sample": []}
        for block in _nonempty(blocks):
            for result in from_table(block.to_arrow()):
                if result.error is not None:
                    out["failed"] += 1
                    continue
                out["detections"] += 1
                decision, _ = result.decision(self.options.thresholds)
                out["decisions"][decision] = out["decisions"].get(decision, 0) + 1
                rows = result.rows(thresholds=self.options.thresholds, model_version=self.model_version, run_id=None)
                out["score_rows"] += len(rows)
                if rows and len(out["sample"]) < SAMPLE_ROWS:
                    top = rows[0]
                    out["sample"].append(
                        {"detection_id": top.detection_id, "deer_id": top.deer_id, "top1": round(top.similarity, 6)}
                    )
        return out

    def on_write_complete(self, write_result: WriteResult[dict[str, Any]]) -> None:
        """Merge the tasks' summaries (runs on the driver)."""
        for part in write_result.write_returns:
            for key in ("detections", "score_rows", "failed"):
                self.summary[key] += part[key]
            for decision, n in part["decisions"].items():
                self.summary["decisions"][decision] = self.summary["decisions"].get(decision, 0) + n
            room = SAMPLE_ROWS - len(self.summary["sample"])
            self.summary["sample"].extend(part["sample"][:room])
