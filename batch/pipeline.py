"""The backfill as a Ray Data pipeline (the Ray edge; the work itself is plain Python in batch/).

id ranges -> read a range's detections (one SQL query) and decode + crop them (one CPU task per range,
yielding a block per embedding batch) -> embed + match against the site galleries (actor pool: one GPU
per actor on GPU nodes) -> :class:`batch.tasks.ScoreSink` (binary COPY, one transaction per block).
Nothing passes through the driver. With ``decode="gpu"`` the CPU tasks only read the files and the
actors decode and crop on their GPU (:mod:`batch.device_crops`). The tasks' code is in
:mod:`batch.tasks`, which imports no torch; this module (the actors' code) does.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image
from ray.data import Dataset

from batch.device_crops import device_crops
from batch.galleries import load_galleries
from batch.results import Scored, to_table
from batch.runs import BackfillOptions, Selection
from batch.tasks import read_and_decode, read_and_fetch
from serve_app.reid.embedder import Embedder, embedding_to_bytes
from serve_app.reid.gallery import Gallery
from serve_app.reid.preprocessing import IMAGENET_MEAN, IMAGENET_STD, BBox

logger = logging.getLogger(__name__)

DECODE_CPUS = 0.5
"""Logical CPUs per decode task."""
WRITE_CPUS = 0.25
"""Logical CPUs per write task (mostly waiting on Postgres)."""


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
    # One task per id range (batch_size=1: two map steps with their own batch sizes would be fused into one
    # task that takes as many ranges as the larger batch size), yielding a block per embedding batch so the
    # actors start on a range's first crops while the rest of it is decoded.
    prepare: functools.partial[Any]
    if options.decode == "gpu":
        prepare = functools.partial(read_and_fetch, dsn=dsn, selection=selection, image_root=str(image_root),
                                    chunk=options.batch_size)  # fmt: skip
    else:
        draft = options.decode == "draft"
        prepare = functools.partial(read_and_decode, dsn=dsn, selection=selection, image_root=str(image_root),
                                    chunk=options.batch_size, size_px=size, draft=draft)  # fmt: skip
    # Other CPU figures than the actor's keep Ray Data from fusing these tasks into the embedding actor.
    ds = ds.map_batches(prepare, batch_size=1, num_cpus=DECODE_CPUS)
    if options.decode != "gpu":
        # Ray Data joins what a task yields into blocks of up to target_max_block_size (128 MiB by default): at
        # one embedding batch of crops, each yield is a block of its own and leaves the task as it is yielded.
        # (The file bytes the gpu path yields have no fixed size: those blocks keep the default.)
        ds.context.target_max_block_size = options.batch_size * size * size * 3
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
