"""Backfill detections/s end to end vs raw model forward passes and vs a sequential one-at-a-time baseline.

All of them use the same model, input size and (for the raw passes) batch size, on the same machine in
one run, with serve_config.yaml's model by default. ``--quick`` (or BENCH_QUICK=1): fewer detections.
Another case does a detection's own work and nothing else, in one process: decode its frame, crop it and
embed it in batches (no Ray, no database, no scoring), for each CPU decode mode measured, alternated with the
raw passes in ``--rounds`` rounds; over the raw passes it is what decoding leaves of the model's rate, and
the backfill over it is the pipeline's own cost.

Another model, ``--decode`` mode (repeat it to compare modes) and ``--copies`` serve the GPU check
(benchmarks/gpu_check.sh): each mode is also run on a quarter of the detections, and the difference of the
two runs gives the rate a long backfill settles at, without the start-up (actors, model, galleries) that a
short run cannot hide.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import ray
import torch
from PIL import Image

from batch.backfill import ensure_ray, options_from_args, parse_args, run_backfill
from batch.crops import load_crop
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
    batch = embedder.dummy_batch(options.batch_size).normal_()  # the layout real crops have
    embedder.embed_tensor(batch)  # warm-up
    passes = max(1, detections // options.batch_size)
    start = time.perf_counter()
    for _ in range(passes):
        embedder.embed_tensor(batch)
    return passes * options.batch_size / (time.perf_counter() - start)


def decode_and_forward(
    options: BackfillOptions, *, dsn: str, image_root: Path, sites: list[int], limit: int, draft: bool
) -> float:
    """A detection's own work in one process: decode its frame and crop it as the backfill does
    (:func:`batch.crops.load_crop`), embed the crops in batches; detections/s."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT i.uri, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h FROM detections d JOIN images i ON i.id = d.image_id"
            " JOIN cameras c ON c.id = i.camera_id WHERE c.site_id = ANY(%s) ORDER BY d.id LIMIT %s",
            (sites, limit),
        ).fetchall()
    embedder = Embedder(options.spec)
    size = options.input_size_px
    embedder.embed_tensor(embedder.dummy_batch(options.batch_size))
    start = time.perf_counter()
    for k in range(0, len(rows), options.batch_size):
        crops = [load_crop(image_root / uri, BBox(*box), size_px=size, draft=draft)
                 for uri, *box in rows[k : k + options.batch_size]]  # fmt: skip
        embedder.embed_crops([Image.fromarray(c) for c in crops])
    return len(rows) / (time.perf_counter() - start)


def forward_rounds(
    options: BackfillOptions, *, dsn: str, image_root: Path, sites: list[int], limit: int, modes: list[str], rounds: int
) -> tuple[list[float], dict[str, list[float]]]:
    """Raw forward passes and each CPU decode mode's one-process work, alternated ``rounds`` times (this VM's
    speed drifts within minutes, so the two sides of a ratio are measured close together); the rates per round."""
    raw: list[float] = []
    own: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        raw.append(raw_model(options, detections=limit))
        for mode in modes:
            draft = mode == "draft"
            own[mode].append(decode_and_forward(options, dsn=dsn, image_root=image_root, sites=sites, limit=limit,
                                                draft=draft))  # fmt: skip
    return raw, own


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


def add_copies(dsn: str, sites: list[int], *, copies: int) -> int:
    """Make each demo detection of ``sites`` appear ``copies`` times (new rows on the same frame and box, each
    decoded again when scored), the copies after every original in id order so that a batch's neighbours are
    other frames; returns the detections in those sites. Idempotent."""
    scope = "FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id"
    with psycopg.connect(dsn) as conn:
        originals = conn.execute(
            f"SELECT count(*) {scope} JOIN demo_ground_truth g ON g.detection_id = d.id WHERE c.site_id = ANY(%s)",
            (sites,),
        ).fetchone()
        present = conn.execute(f"SELECT count(*) {scope} WHERE c.site_id = ANY(%s)", (sites,)).fetchone()
        assert originals is not None and present is not None and originals[0]
        for _ in range(present[0] // originals[0], copies):
            conn.execute(
                "INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h, confidence)"
                f" SELECT d.image_id, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h, d.confidence {scope}"
                " JOIN demo_ground_truth g ON g.detection_id = d.id WHERE c.site_id = ANY(%s) ORDER BY d.id",
                (sites,),
            )
        conn.commit()
        return int(max(present[0], originals[0] * copies))


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    """Load demo data into the benchmark database, measure the cases, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1")
    parser.add_argument("--detections", type=int, help="detections scored by the backfill")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="mobilenet_v2:imagenet", help="ARCH:WEIGHTS, as batch.backfill takes it")
    parser.add_argument("--input-size-px", type=int, default=128)
    parser.add_argument("--decode", action="append", choices=["exact", "draft", "gpu"],
                        help="backfill decode mode (repeatable: each one measured; default exact)")  # fmt: skip
    parser.add_argument("--images", type=int, help="demo frames rendered (default: the detections, at least 200)")
    parser.add_argument("--copies", type=int, default=1, help="times each demo detection is scored (copied rows)")
    parser.add_argument("--no-sequential", action="store_true", help="skip the one-at-a-time baseline")
    parser.add_argument(
        "--long-run", action="store_true", help="also run each mode on a quarter: the rate without start-up"
    )
    parser.add_argument("--target-det-s", type=float, help="a target for the long-run rate (the GPU check's)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="alternating rounds of the raw and one-process cases")  # fmt: skip
    parser.add_argument("--results-name", default="backfill", help="benchmarks/results/<name>.json")
    args = parser.parse_args(argv)
    quick = args.quick
    decodes: list[str] = args.decode or ["exact"]
    n = args.detections or (args.images or 0) * args.copies or (400 if quick else 1500)
    overrides = bench_settings()
    prepare_database(overrides)
    settings = Settings(**overrides)
    dsn = settings.database_dsn
    params = DemoParams(2, 6, 40, args.images or max(n, 200), 7)
    load_demo(dsn, image_root=settings.image_root, params=params, workers=None)
    with psycopg.connect(dsn) as conn:
        pattern = f"Demo site % [{params.signature()}]"
        sites = [r[0] for r in conn.execute("SELECT id FROM sites WHERE name LIKE %s ORDER BY id", (pattern,))]
    n = min(n, add_copies(dsn, sites, copies=args.copies))
    flags = ["--model", args.model, "--input-size-px", str(args.input_size_px), "--batch-size", str(args.batch_size),
             "--mode", "all", *(f"--site={site}" for site in sites)]  # fmt: skip

    def backfill_options(limit: int, decode: str = "exact") -> BackfillOptions:
        return options_from_args(parse_args([*flags, "--limit", str(limit), "--decode", decode]))

    options = backfill_options(n)
    arch, size = options.architecture, options.input_size_px
    os.environ.update({k: v for k, v in ray_env().items() if k not in os.environ})  # as make run's head has it
    ensure_ray()
    # Warm-up: stores the gallery embeddings, so every measured case finds them ready.
    run_backfill(backfill_options(args.batch_size), settings=settings)
    case = f"{arch} {size}px batch {args.batch_size}"
    rows: list[dict[str, Any]] = []
    rates: dict[str, float] = {}
    for decode in decodes:
        short = run_backfill(backfill_options(max(1, n // 4), decode), settings=settings) if args.long_run else None
        full = run_backfill(backfill_options(n, decode), settings=settings)
        rates[decode] = full.detections_per_s
        rows.append({"case": f"backfill end to end, decode {decode} ({case}, {full.detections} detections, "
                     f"{full.elapsed_s:.1f} s with start-up)", "metric": "det/s", "value": full.detections_per_s,
                     "unit": "det/s"})  # fmt: skip
        if short is not None:
            # Two runs that differ only in size: their difference is what a run costs once started.
            extra_s = full.elapsed_s - short.elapsed_s
            long_run = (full.detections - short.detections) / extra_s if extra_s > 0 else 0.0
            note = "start-up taken out" if extra_s > 0 else "not measurable: the longer run was not slower"
            target = f">= {args.target_det_s:g}" if args.target_det_s else None
            rows.append({"case": f"backfill long-run rate, decode {decode} (runs of {short.detections} and "
                         f"{full.detections}: {note})", "metric": "det/s", "value": long_run, "unit": "det/s",
                         "target": target})  # fmt: skip
    ray.shutdown()
    root = Path(settings.image_root).resolve()
    modes = [mode for mode in decodes if mode != "gpu"]  # the one-process work decodes on the CPU
    raw_rounds, own_rounds = forward_rounds(options, dsn=dsn, image_root=root, sites=sites, limit=min(n, 640),
                                            modes=modes, rounds=args.rounds)  # fmt: skip
    raw = statistics.median(raw_rounds)
    rows.append({"case": f"raw model on ready tensors ({arch} {size}px; median of {args.rounds} rounds)",
                 "metric": "det/s", "value": raw, "unit": "det/s"})  # fmt: skip
    for decode in decodes:
        rows.append({"case": f"backfill (decode {decode}) / raw model", "metric": "ratio",
                     "value": rates[decode] / raw, "unit": "x", "target": ">= 0.8"})  # fmt: skip
    own_case = "decode, crop and forward in one process"
    for mode in modes:
        own = statistics.median(own_rounds[mode])
        shares = [o / r for o, r in zip(own_rounds[mode], raw_rounds, strict=True)]
        per_round = ", ".join(f"{x:.2f}" for x in shares)
        rows += [
            {"case": f"{own_case}, decode {mode} ({case}, no Ray, no database; median)", "metric": "det/s",
             "value": own, "unit": "det/s"},
            {"case": f"{own_case}, decode {mode} / raw model (what decoding leaves; rounds {per_round})",
             "metric": "ratio", "value": statistics.median(shares), "unit": "x"},
            {"case": f"backfill (decode {mode}) / {own_case}", "metric": "ratio", "value": rates[mode] / own,
             "unit": "x"},
        ]  # fmt: skip
    backfill = rates[decodes[0]]
    if not args.no_sequential:
        seq = sequential(options, dsn=dsn, image_root=root, duration_s=30 if quick else 60, sites=sites)
        rows += [
            {"case": f"sequential one at a time ({arch} {size}px)", "metric": "det/s", "value": seq, "unit": "det/s"},
            {"case": "backfill / sequential", "metric": "ratio", "value": backfill / max(seq, 1e-9), "unit": "x",
             "target": ">= 20"},
        ]  # fmt: skip
    cuda = torch.cuda.is_available()
    meta = {
        "quick": quick,
        "cpus": os.cpu_count(),
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }
    write_results(args.results_name, rows, meta=meta)


if __name__ == "__main__":
    main()
