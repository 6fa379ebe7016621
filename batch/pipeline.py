"""The backfill as a Ray Data pipeline (the Ray edge; the work itself is plain Python in batch/).

id ranges -> read detections (one SQL query per range, CPU tasks) -> decode + crop (CPU tasks)
-> embed + match against the site galleries (actor pool: one GPU per actor on GPU nodes)
-> :class:`ScoreSink` (binary COPY, one transaction per block). Nothing passes through the driver.
With ``decode="gpu"`` the CPU tasks only read the files and the actors decode and crop on their GPU
(:mod:`batch.device_crops`).
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import ray
import torch
from PIL import Image
from psycopg.rows import dict_row
from ray.data import Dataset, Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from batch.crops import UnreadableImage, image_path, load_crop
from batch.device_crops import device_crops
from batch.galleries import load_galleries
from batch.results import Scored, from_table, to_table
from batch.runs import READ_SQL, BackfillOptions, Selection
from batch.score_writer import BlockCounts, write_block
from serve_app.reid.embedder import Embedder, embedding_to_bytes
from serve_app.reid.gallery import Gallery
from serve_app.reid.preprocessing import IMAGENET_MEAN, IMAGENET_STD, BBox

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 5
DECODE_BATCH = 16
DECODE_CPUS = 0.5
"""Logical CPUs per decode task."""
WRITE_CPUS = 0.25
"""Logical CPUs per write task (mostly waiting on Postgres)."""


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


class EmbedAndMatch:
    """Actor: the model and the site galleries on one device; crops in, similarities per profile out."""

    def __init__(
        self, *, options: dict[str, Any], dsn: str, image_root: str, sites: list[int], store: bool, cpu_threads: int
    ) -> None:
        self.options = BackfillOptions.from_json(options)
        if cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        self.embedder = Embedder(self.options.spec)
        self.keep_embeddings = self.options.store_embeddings
        self.galleries: dict[int, Gallery] = load_galleries(
            dsn, sites, embedder=self.embedder, image_root=Path(image_root), store=store
        )

    def _inputs(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor) or self.embedder.device.type == "cuda":
            # Normalize on the device (ship uint8 to a GPU): the same arithmetic as to_batch, there.
            batch = torch.as_tensor(crops).to(self.embedder.device, non_blocking=True)
            batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
            mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
            return batch.sub_(mean).div_(std)
        return self.embedder.preprocess([Image.fromarray(c) for c in crops])

    def _decode(self, batch: dict[str, np.ndarray], errors: list[str]) -> torch.Tensor:
        """Crops of the files a batch carries, decoded on the embedder's device; fills in their errors."""
        readable = [i for i, e in enumerate(errors) if not e]
        bboxes: list[BBox] = []
        for i in list(readable):
            try:
                bboxes.append(BBox(*(float(batch[k][i]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))))
            except ValueError as exc:
                errors[i] = str(exc)
                readable.remove(i)
        uris = [str(batch["uri"][i]) for i in readable]
        crops, failed = device_crops(uris, [bytes(batch["data"][i]) for i in readable], bboxes,
                                     size_px=self.options.input_size_px, device=self.embedder.device)  # fmt: skip
        out = torch.zeros((len(errors), *crops.shape[1:]), dtype=torch.uint8, device=crops.device)
        out[torch.as_tensor(readable, dtype=torch.long, device=crops.device)] = crops
        for i, error in zip(readable, failed, strict=True):
            if error:
                errors[i] = error
                logger.warning("detection %d not scored: %s", int(batch["detection_id"][i]), error)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Embed the readable crops of a batch and score them against their site's gallery."""
        errors = [str(e) for e in batch["error"]]
        crops = batch["crop"] if "crop" in batch else self._decode(batch, errors)
        ok = np.flatnonzero([not e for e in errors])
        chosen = crops[ok] if isinstance(crops, np.ndarray) else crops[torch.as_tensor(ok, device=crops.device)]
        vectors = self.embedder.embed_tensor(self._inputs(chosen)) if len(ok) else np.zeros((0, 1))
        sites = batch["site_id"][ok]
        sims: dict[int, np.ndarray] = {}
        for site in np.unique(sites).tolist():
            rows = np.flatnonzero(sites == site)
            gallery = self.galleries.get(int(site))
            scores = gallery.score(vectors[rows]) if gallery is not None else np.zeros((len(rows), 0))
            for j, row in enumerate(rows.tolist()):
                sims[int(ok[row])] = scores[j]
        vec_of = {int(i): vectors[j] for j, i in enumerate(ok.tolist())}
        items = []
        for i, det in enumerate(batch["detection_id"].tolist()):
            site = int(batch["site_id"][i])
            gallery = self.galleries.get(site)
            ok_row = not errors[i]
            items.append(
                Scored(
                    detection_id=int(det),
                    site_id=site,
                    deer_ids=list(gallery.deer_ids) if ok_row and gallery is not None else [],
                    similarities=sims.get(i, np.zeros(0, dtype=np.float32)),
                    embedding=embedding_to_bytes(vec_of[i]) if ok_row and self.keep_embeddings else None,
                    error=errors[i] or None,
                )
            )
        return to_table(items)


class ScoreSink(Datasink[dict[str, int]]):
    """Writes result blocks with binary COPY, one transaction per block; counts come back to the driver."""

    def __init__(self, *, dsn: str, run_id: uuid.UUID, model_version: str, options: BackfillOptions) -> None:
        self.dsn = dsn
        self.run_id = run_id
        self.model_version = model_version
        self.options = options
        self.counts = BlockCounts()

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, int]:
        """Write every block of this task; each block commits on its own."""
        total = BlockCounts()
        with psycopg.connect(self.dsn) as conn:
            for block in blocks:
                results = list(from_table(BlockAccessor.for_block(block).to_arrow()))
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

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        """Count rows and decisions of this task's blocks."""
        out: dict[str, Any] = {"detections": 0, "score_rows": 0, "failed": 0, "decisions": {}, "sample": []}
        for block in blocks:
            for result in from_table(BlockAccessor.for_block(block).to_arrow()):
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


def gpu_count() -> int:
    """GPUs in the cluster (0 on CPU-only clusters)."""
    return int(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]


def build_dataset(
    *,
    dsn: str,
    selection: Selection,
    ranges: list[tuple[int, int]],
    options: BackfillOptions,
    image_root: Path,
    sites: list[int],
    store_galleries: bool,
    actors: int | None = None,
    cpu_threads: int = 0,
) -> Dataset:
    """The lazy dataset of results; nothing runs until a sink consumes it."""
    gpus = gpu_count()
    size = options.input_size_px
    items = [{"lo": lo, "hi": hi} for lo, hi in ranges]
    ds: Dataset = ray.data.from_items(items, override_num_blocks=max(1, len(ranges)))
    read = functools.partial(read_ranges, dsn=dsn, selection=selection)
    ds = ds.map_batches(read, batch_size=1, num_cpus=DECODE_CPUS)
    if options.decode == "gpu":
        read_bytes = functools.partial(read_files, image_root=str(image_root))
        ds = ds.map_batches(read_bytes, batch_size=DECODE_BATCH, num_cpus=DECODE_CPUS)
    else:
        decode = functools.partial(decode_crops, image_root=str(image_root), size_px=size,
                                   draft=options.decode == "draft")  # fmt: skip
        # Other CPU figures than the actor's keep Ray Data from fusing decoding into the embedding actor.
        ds = ds.map_batches(decode, batch_size=DECODE_BATCH, num_cpus=DECODE_CPUS)
    pool = actors or max(1, gpus)
    resources: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    return ds.map_batches(
        EmbedAndMatch,
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool),
        fn_constructor_kwargs={
            "options": options.as_json(),
            "dsn": dsn,
            "image_root": str(image_root),
            "sites": sites,
            "store": store_galleries,
            "cpu_threads": cpu_threads or (0 if gpus else (os.cpu_count() or 1)),
        },
        batch_format="numpy",
        **resources,
    )
