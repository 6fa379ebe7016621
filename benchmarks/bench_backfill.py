"""Backfill detections/s end to end vs raw model forward passes and vs a sequential one-at-a-time baseline.

All three use the same model, input size and (for the raw passes) batch size, on the same machine in
one run, with serve_config.yaml's model. ``--quick`` (or BENCH_QUICK=1): fewer detections.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import ray
import torch
from PIL import Image

from batch.backfill import ensure_ray, run_backfill
from batch.demo_data import DemoParams, load_demo
from batch.galleries import load_site_gallery
from batch.runs import BackfillOptions
from benchmarks.common import bench_settings, prepare_database, ray_env, write_results
from serve_app.config import Settings
from serve_app.reid.decision import Thresholds
from serve_app.reid.embedder import Embedder
from serve_app.reid.preprocessing import BBox, crop
from serve_app.reid.scores import COLUMNS, score_rows

_PLACEHOLDERS = ", ".join(["%s"] * len(COLUMNS))
INSERT_ONE_SQL = f"INSERT INTO reid_similarity_scores ({', '.join(COLUMNS)}) VALUES ({_PLACEHOLDERS})"
SELECT_ONE_SQL = """
SELECT d.id, c.site_id, i.uri, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h FROM detections d
JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id
WHERE d.id > %s AND c.site_id = ANY(%s) ORDER BY d.id LIMIT 1
"""


def raw_model(options: BackfillOptions, *, detections: int) -> float:
    """Forward passes on ready tensors: detections/s."""
    embedder = Embedder(options.spec)
    batch = torch.randn(options.batch_size, 3, options.input_size_px, options.input_size_px)
    embedder.embed_tensor(batch)  # warm-up
    passes = max(1, detections // options.batch_size)
    start = time.perf_counter()
    for _ in range(passes):
        embedder.embed_tensor(batch)
    return passes * options.batch_size / (time.perf_counter() - start)


def sequential(options: BackfillOptions, *, dsn: str, image_root: Path, duration_s: float, sites: list[int]) -> float:
    """The old script's shape: select one, load its image, embed it alone, score, INSERT each row, commit."""
    embedder = Embedder(options.spec)
    thresholds = Thresholds(options.accept_threshold)
    done, last_id = 0, 0

    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        start = time.perf_counter()
        while time.perf_counter() - start < duration_s:
            det = conn.execute(SELECT_ONE_SQL, (last_id, sites)).fetchone()
            if det is None:
                break
            last_id = det["id"]
            image = Image.open(image_root / det["uri"]).convert("RGB")
            bbox = BBox(det["bbox_x"], det["bbox_y"], det["bbox_w"], det["bbox_h"])
            vector = embedder.embed_crops([crop(image, bbox)])
            gallery, _ = load_site_gallery(conn, det["site_id"], embedder=embedder, image_root=image_root, store=True)
            sims = gallery.score(vector)[0]
            top = int(np.argmax(sims)) if len(sims) else None
            assigned = gallery.deer_ids[top] if top is not None and sims[top] >= thresholds.accept else None
            for row in score_rows(det["id"], deer_ids=gallery.deer_ids, similarities=sims,
                                  threshold=thresholds.accept, assigned_deer_id=assigned,
                                  model_version=embedder.model_version, source="backfill"):  # fmt: skip
                conn.execute(INSERT_ONE_SQL, row.as_tuple())
            conn.commit()
            done += 1
        return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Load demo data into the benchmark database, measure the three cases, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1")
    parser.add_argument("--detections", type=int, help="detections scored by the backfill")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    quick = args.quick
    # serve_config.yaml's model (MobileNetV2, packaged ImageNet weights, 128 px); --quick: fewer detections.
    arch, size, n = ("mobilenet_v2", 128, 400) if quick else ("mobilenet_v2", 128, 1500)
    n = args.detections or n
    overrides = bench_settings()
    prepare_database(overrides)
    settings = Settings(**overrides)
    dsn = settings.database_dsn
    params = DemoParams(2, 6, 40, max(n, 200), 7)
    load_demo(dsn, image_root=settings.image_root, params=params, workers=None)
    with psycopg.connect(dsn) as conn:
        pattern = f"Demo site % [{params.signature()}]"
        sites = [r[0] for r in conn.execute("SELECT id FROM sites WHERE name LIKE %s ORDER BY id", (pattern,))]
    common: dict[str, Any] = {
        "architecture": arch, "weights": "imagenet", "input_size_px": size, "batch_size": args.batch_size,
        "mode": "all",
    }  # fmt: skip
    options = BackfillOptions(**common, limit=n, sites=tuple(sites))
    os.environ.update({k: v for k, v in ray_env().items() if k not in os.environ})  # as make run's head has it
    ensure_ray()
    # Warm-up: stores the gallery embeddings, so both measured cases find them ready.
    run_backfill(BackfillOptions(**common, limit=args.batch_size, sites=tuple(sites)), settings=settings)
    result = run_backfill(options, settings=settings)
    backfill = result.detections_per_s
    ray.shutdown()
    raw = raw_model(options, detections=max(n // 2, args.batch_size * 4))
    root = Path(settings.image_root).resolve()
    seq = sequential(options, dsn=dsn, image_root=root, duration_s=30 if quick else 60, sites=sites)
    case = f"{arch} {size}px batch {args.batch_size}, {result.detections} detections"
    rows = [
        {"case": f"backfill end to end ({case})", "metric": "det/s", "value": backfill, "unit": "det/s"},
        {"case": f"raw model on ready tensors ({arch} {size}px)", "metric": "det/s", "value": raw, "unit": "det/s"},
        {"case": f"sequential one at a time ({arch} {size}px)", "metric": "det/s", "value": seq, "unit": "det/s"},
        {"case": "backfill / raw model", "metric": "ratio", "value": backfill / raw, "unit": "x", "target": ">= 0.8"},
        {"case": "backfill / sequential", "metric": "ratio", "value": backfill / max(seq, 1e-9), "unit": "x",
         "target": ">= 20"},
    ]  # fmt: skip
    write_results("backfill", rows, meta={"quick": quick, "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()})


if __name__ == "__main__":
    main()
