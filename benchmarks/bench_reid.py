"""Online re-ID and score logging, side by side in one run.

1. Identifications/s through Serve (batching, 32 concurrent clients, serve_config.yaml's model: MobileNetV2 with
   its packaged ImageNet weights at 128 px, requests carrying
   image URIs) vs raw model forward passes on ready tensors at the same batch size (target >= 0.8),
   in alternating rounds while the application is up.
2. Score logging for 50 profiles: the replica's ScoreBuffer (binary COPY, its default concurrent writers, and
   one writer for comparison) vs row-by-row INSERT, ms per detection and rows/s (target <= 0.5 ms per
   detection), and what logging costs the identification itself: building the rows and queueing them in
   the ScoreBuffer (the COPY runs behind it, off the request path).

``--config serve_config.gpu.yaml`` deploys that config's ingress and ReID args (model, batching, ``num_gpus``)
instead, and the raw passes run its model at its batch size (on CUDA when there is one); ``--clients`` sets
the load's concurrency; ``--no-score-log`` skips part 2. benchmarks/gpu_check.sh runs it that way.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import yaml
from PIL import Image

from benchmarks.common import bench_settings, fetch_value, prepare_database, serve_app, write_results
from serve_app.reid.embedder import Embedder, ModelSpec
from serve_app.reid.score_buffer import BufferLimits, ScoreBuffer
from serve_app.reid.scores import ScoreRow, score_rows
from serve_app.store.db import connect, drop_database, with_database
from serve_app.store.migrate import apply_migrations

BATCH = 32
CLIENTS = 32
PROFILES = 50
SCORE_DB = "trailcam_bench_scores"  # the score log cases' scratch database, dropped after them
# Intra-op threads of the ReID replica: Ray gives a num_cpus=1 actor one OpenMP thread; the raw case
# runs with torch's default (all cores), so the replica gets the same count.
TORCH_THREADS = os.cpu_count() or 1
# serve_config.yaml's model (a fine-tuned one has the same architecture and size, so the same cost).
MODEL_ARCH, MODEL_WEIGHTS, MODEL_PX = "mobilenet_v2", "imagenet", 128
MODEL: dict[str, Any] = {"architecture": MODEL_ARCH, "weights": MODEL_WEIGHTS, "input_size_px": MODEL_PX}


def synthetic_frames(root: Path, n: int) -> list[str]:
    """1280x720 JPEGs (smooth noise) under the image root; reused between runs."""
    rng = np.random.default_rng(7)
    uris = []
    for i in range(n):
        rel = f"bench-reid/frame-{i:04d}.jpg"
        path = root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 255, (45, 80, 3), dtype=np.uint8)
            Image.fromarray(small).resize((1280, 720), Image.Resampling.BILINEAR).save(path, quality=85)
        uris.append(rel)
    return uris


def seed_site(dsn: str, uris: list[str], *, profiles: int) -> tuple[int, int]:
    """A fresh site with a camera and ``profiles`` deer, each with one gallery detection; returns (site, camera)."""
    with connect(dsn, autocommit=True) as conn:
        name = f"bench-reid-{time.time_ns()}"
        site = fetch_value(conn, "INSERT INTO sites (name) VALUES (%s) RETURNING id", (name,))
        cam = fetch_value(conn, "INSERT INTO cameras (site_id, name) VALUES (%s, 'cam') RETURNING id", (site,))
        for i in range(profiles):
            img = fetch_value(
                conn,
                # The time the load's bodies send: a recorded image must be named with its own camera and time.
                "INSERT INTO images (camera_id, uri, captured_at, width, height)"
                " VALUES (%s, %s, '2024-05-01T06:30:00Z', 1280, 720)"
                " ON CONFLICT (uri) DO UPDATE SET uri = EXCLUDED.uri RETURNING id",
                (cam, uris[i % len(uris)]),
            )
            deer = fetch_value(conn, "INSERT INTO deer (site_id, name) VALUES (%s, %s) RETURNING id", (site, f"d{i}"))
            conn.execute(
                "INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h, deer_id, decision)"
                " VALUES (%s, 0.3, 0.3, 0.3, 0.4, %s, 'manual')",
                (img, deer),
            )
        return int(site), int(cam)


def failure_kind(resp: httpx.Response) -> str:
    """A failed answer's status and problem title, to count failures by kind."""
    try:
        title = resp.json().get("title", "")
    except ValueError:
        title = resp.text[:80]
    return f"{resp.status_code} {title}".strip()


async def drive(
    url: str,
    key: str,
    bodies: list[dict[str, Any]],
    *,
    clients: int,
    duration_s: float,
    failures: Counter[str] | None = None,
) -> tuple[int, int]:
    """``clients`` concurrent loops posting detections for ``duration_s``; returns (ok, failed) and counts each
    failure's kind in ``failures``."""
    ok = failed = 0
    deadline = time.monotonic() + duration_s
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:

        async def worker(offset: int) -> None:
            nonlocal ok, failed
            i = offset
            while time.monotonic() < deadline:
                resp = await client.post(url + "/api/detections", json=bodies[i % len(bodies)])
                if resp.status_code == 201:
                    ok += 1
                else:
                    failed += 1
                    if failures is not None:
                        failures[failure_kind(resp)] += 1
                i += clients

        await asyncio.gather(*(worker(c) for c in range(clients)))
    return ok, failed


def bench_app_args(settings: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's own app: serve_config.yaml's model on one replica with the raw case's torch threads."""
    reid = {
        "max_batch_size": BATCH,
        "max_ongoing_requests": 2 * BATCH,
        "batch_wait_timeout_s": 0.1,
        "num_replicas": 1,
        "torch_threads": TORCH_THREADS,
        **MODEL,
    }
    return {"settings": settings, "reid": reid}


def config_app_args(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """A Serve config file's application args (ingress and ReID as deployed), pointed at the benchmark's services."""
    (application,) = yaml.safe_load(path.read_text())["applications"]
    return {**application["args"], "settings": settings}


def serve_and_raw(
    settings: dict[str, Any],
    key: str,
    uris: list[str],
    *,
    app_args: dict[str, Any],
    clients: int,
    warmup_s: float,
    duration_s: float,
    raw_iterations: int,
    rounds: int,
) -> list[dict[str, Any]]:
    """Serve and raw forward passes measured in alternating rounds while the application is up.

    Interleaving pairs each Serve window with a raw measurement taken under the same machine
    conditions (a shared 2-core VM drifts by tens of percent within minutes); the ratio is taken
    per round and summarised by its median.
    """
    _site, cam = seed_site(settings["database_url"], uris, profiles=10)
    with connect(settings["database_url"], autocommit=True) as conn:
        # An earlier run recorded these frames under its own camera, and a recorded image named with another
        # camera is refused (409): this run's camera takes them over.
        conn.execute(
            "UPDATE images SET camera_id = %s, captured_at = '2024-05-01T06:30:00Z' WHERE uri = ANY(%s)", (cam, uris)
        )
    bodies = [
        {
            "image_uri": u,
            "camera_id": cam,
            "captured_at": "2024-05-01T06:30:00Z",
            "bbox": {"x": 0.3, "y": 0.25, "w": 0.35, "h": 0.5},
        }
        for u in uris
    ]
    reid = app_args["reid"]
    size = int(reid.get("max_batch_size", BATCH))
    embedder = Embedder(ModelSpec(reid["architecture"], reid["weights"], input_size_px=reid["input_size_px"]))
    batch = embedder.dummy_batch(size).normal_()
    embedder.embed_tensor(batch)
    out = []
    with serve_app(app_args) as url:
        asyncio.run(drive(url, key, bodies, clients=clients, duration_s=warmup_s))  # warm-up: gallery, batches
        for _ in range(rounds):
            start = time.monotonic()
            for _ in range(raw_iterations):
                embedder.embed_tensor(batch)
            raw_rate = raw_iterations * size / (time.monotonic() - start)
            start = time.monotonic()
            kinds: Counter[str] = Counter()
            ok, failed = asyncio.run(drive(url, key, bodies, clients=clients, duration_s=duration_s, failures=kinds))
            rate = ok / (time.monotonic() - start)
            out.append({"serve": rate, "raw": raw_rate, "failed": float(failed), "failures": dict(kinds)})
    return out


async def drain(dsn: str, rows: list[ScoreRow], *, writers: int) -> float:
    """Seconds for a started ScoreBuffer with ``writers`` to write ``rows`` queued at once."""
    drained = asyncio.Event()

    def written(_n: int) -> None:
        if not buffer.pending:
            drained.set()

    buffer = ScoreBuffer(dsn, limits=BufferLimits(max_buffered_rows=len(rows), writers=writers), on_written=written)
    buffer.start()
    await asyncio.sleep(0.2)  # writers idle, connections not yet opened: opening them is part of the time
    start = time.monotonic()
    buffer.add(rows)
    await drained.wait()
    elapsed = time.monotonic() - start
    await buffer.close()
    assert (buffer.stats.written, buffer.stats.dropped) == (len(rows), 0), buffer.stats
    return elapsed


def prefill_scores(conn: psycopg.Connection[Any], *, site: int, image: int, rows: int) -> int:
    """``rows`` older score rows (50 per detection) for the site's deer, so each run writes into a table of
    the same size: a score write costs more as the table's indexes grow. Returns the rows written."""
    written = conn.execute(
        "WITH dets AS (INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h)"
        " SELECT %(image)s, 0.1, 0.1, 0.2, 0.2 FROM generate_series(1, %(n)s) RETURNING id)"
        " INSERT INTO reid_similarity_scores (detection_id, deer_id, similarity, rank, threshold, matched,"
        " model_version, source, computed_at)"
        " SELECT d.id, e.id, random() * 1.1 - 0.2, row_number() OVER (PARTITION BY d.id ORDER BY e.id), 0.55,"
        " false, 'bench', 'online', now() - interval '1 day' FROM dets d CROSS JOIN deer e WHERE e.site_id = %(site)s",
        {"image": image, "n": rows // PROFILES, "site": site},
    ).rowcount
    conn.execute("VACUUM ANALYZE reid_similarity_scores")
    return written


def score_case(
    base_dsn: str, uris: list[str], *, detections: int, insert_detections: int, table_rows: int
) -> list[dict[str, Any]]:
    """In a scratch database whose score table holds ``table_rows`` rows, the ScoreBuffer writes ``detections``
    x 50 rows with its default writers, then with one; INSERT ``insert_detections`` x 50 rows one by one."""
    dsn = with_database(base_dsn, SCORE_DB)
    drop_database(dsn)
    apply_migrations(dsn)
    try:
        return _score_case(dsn, uris, detections=detections, insert_detections=insert_detections, table_rows=table_rows)
    finally:
        drop_database(dsn)


def _score_case(
    dsn: str, uris: list[str], *, detections: int, insert_detections: int, table_rows: int
) -> list[dict[str, Any]]:
    site, _cam = seed_site(dsn, uris, profiles=PROFILES)
    with connect(dsn, autocommit=True) as conn:
        deer = [r["id"] for r in conn.execute("SELECT id FROM deer WHERE site_id = %s ORDER BY id", (site,))]
        img = fetch_value(
            conn,
            "SELECT d.image_id FROM detections d JOIN deer e ON e.id = d.deer_id WHERE e.site_id = %s LIMIT 1",
            (site,),
            column="image_id",
        )
        rows_before = prefill_scores(conn, site=site, image=int(str(img)), rows=table_rows)  # the only scores
        ids = [
            r["id"]
            for r in conn.execute(
                "INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h) SELECT %s, 0.1, 0.1, 0.2, 0.2"
                " FROM generate_series(1, %s) RETURNING id",
                (img, 2 * detections + insert_detections),
            ).fetchall()
        ]
    rng = np.random.default_rng(1)

    def rows_for(det: int) -> list[ScoreRow]:
        return score_rows(
            det,
            deer_ids=deer,
            similarities=rng.uniform(-0.2, 0.9, PROFILES).astype(np.float32),
            threshold=0.55,
            assigned_deer_id=None,
            model_version="bench",
        )

    writers = BufferLimits().writers
    copy_s = {
        n: asyncio.run(drain(dsn, [r for d in part for r in rows_for(d)], writers=n))
        for n, part in ((writers, ids[:detections]), (1, ids[detections : 2 * detections]))
    }
    insert_rows = [rows_for(d) for d in ids[2 * detections :]]
    with connect(dsn) as conn:
        start = time.monotonic()
        for det_rows in insert_rows:  # the old shape: one INSERT per score row, one commit per detection
            for r in det_rows:
                conn.execute(
                    "INSERT INTO reid_similarity_scores (detection_id, deer_id, similarity, rank, threshold, matched,"
                    " model_version, source, run_id, computed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    r.as_tuple(),
                )
            conn.commit()
        insert_s = time.monotonic() - start
    n_rows = detections * PROFILES
    n_insert_rows = insert_detections * PROFILES
    buffer = ScoreBuffer(dsn)  # never started: measures the queueing an identification waits for
    start = time.monotonic()
    for det in ids[:detections]:
        buffer.add(rows_for(det))
    enqueue_s = time.monotonic() - start
    assert buffer.pending == n_rows
    out = [
        {
            "case": f"score log on the request path ({PROFILES} profiles)",
            "metric": "ms/det",
            "value": 1000 * enqueue_s / detections,
            "unit": "ms",
            "target": None,
        },
        {
            "case": "score table rows before the score log cases (scratch database)",
            "metric": "rows",
            "value": float(rows_before),
            "unit": "rows",
            "target": None,
        },
    ]
    for n, seconds in copy_s.items():
        case = f"score log COPY ({PROFILES} profiles, {n} writer{'s' if n > 1 else ''})"
        default = n == writers
        out += [
            {"case": case, "metric": "ms/det", "value": 1000 * seconds / detections, "unit": "ms",
             "target": "<= 0.5" if default else None},
            {"case": case, "metric": "rows/s", "value": n_rows / seconds, "unit": "rows/s", "target": None},
        ]  # fmt: skip
    out += [
        {
            "case": f"score log row INSERT ({PROFILES} profiles)",
            "metric": "ms/det",
            "value": 1000 * insert_s / insert_detections,
            "unit": "ms",
            "target": None,
        },
        {
            "case": f"score log row INSERT ({PROFILES} profiles)",
            "metric": "rows/s",
            "value": n_insert_rows / insert_s,
            "unit": "rows/s",
            "target": None,
        },
    ]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration-s", type=float, default=15.0, help="measured Serve load per round")
    parser.add_argument("--raw-iterations", type=int, default=3, help="raw batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--score-detections", type=int, default=2000, help="detections per COPY case")
    parser.add_argument("--insert-detections", type=int, default=200, help="detections logged row by row")
    parser.add_argument(
        "--score-table-rows", type=int, default=1_000_000, help="score rows already in the table the cases write to"
    )
    parser.add_argument(
        "--score-log-only", action="store_true", help="only the score log cases (results in reid_score_log.json)"
    )
    parser.add_argument("--no-score-log", action="store_true", help="skip the score log cases")
    parser.add_argument("--config", type=Path, help="deploy this Serve config's ingress and ReID args (its model)")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="concurrent clients of the Serve load")
    parser.add_argument("--warmup-s", type=float, default=20.0, help="Serve load before the measured rounds")
    parser.add_argument("--results-name", default="reid", help="benchmarks/results/<name>.json")
    args = parser.parse_args(argv)
    settings = bench_settings()
    key = prepare_database(settings)
    uris = synthetic_frames(Path(settings["image_root"]), 200)
    started = dt.datetime.now(dt.UTC)
    score_rows_out = []
    if not args.no_score_log:
        score_rows_out = score_case(
            settings["database_url"],
            uris,
            detections=args.score_detections,
            insert_detections=args.insert_detections,
            table_rows=args.score_table_rows,
        )
    if args.score_log_only:
        write_results("reid_score_log", score_rows_out, meta={"started_at": started.isoformat()})
        return
    app_args = config_app_args(args.config, settings) if args.config else bench_app_args(settings)
    reid = app_args["reid"]
    model, batch = f"{reid['architecture']}@{reid['input_size_px']}", int(reid.get("max_batch_size", BATCH))
    rounds = serve_and_raw(
        settings, key, uris, app_args=app_args, clients=args.clients, warmup_s=args.warmup_s,
        duration_s=args.duration_s, raw_iterations=args.raw_iterations, rounds=args.rounds,
    )  # fmt: skip
    serve_rate = statistics.median(r["serve"] for r in rounds)
    raw_rate = statistics.median(r["raw"] for r in rounds)
    ratio = statistics.median(r["serve"] / r["raw"] for r in rounds)
    failed = sum(r["failed"] for r in rounds)
    kinds = sum((Counter(r["failures"]) for r in rounds), Counter[str]())
    rows: list[dict[str, Any]] = [
        {
            "case": f"Serve identify, batching, {args.clients} clients (median of {len(rounds)} rounds)"
            + (f", {args.config.name}" if args.config else ""),
            "metric": "ids/s",
            "value": serve_rate,
            "unit": "ids/s",
            "target": None,
        },
        {
            "case": f"raw {model} forward, batch {batch} (median; rounds alternate with Serve)",
            "metric": "imgs/s",
            "value": raw_rate,
            "unit": "imgs/s",
            "target": None,
        },
        {
            "case": "Serve / raw (median of per-round ratios)",
            "metric": "ratio",
            "value": ratio,
            "unit": "x",
            "target": ">= 0.8",
        },
        {
            "case": "Serve identify failures"
            + (f" ({', '.join(f'{k}: {n}' for k, n in kinds.most_common(3))})" if kinds else ""),
            "metric": "errors",
            "value": float(failed),
            "unit": "responses",
            "target": "0",
        },
    ]
    rows += score_rows_out
    meta = {
        "started_at": started.isoformat(),
        "model": f"{reid['architecture']}-{reid['weights']}-{reid['input_size_px']}",
        "config": str(args.config) if args.config else None,
        "clients": args.clients,
        "rounds": rounds,
    }
    write_results(args.results_name, rows, meta=meta)


if __name__ == "__main__":
    main()
