"""Soak: `make soak` drives mixed load on 127.0.0.1 for 10 minutes (``--duration-s``) and reports error
rate, p99 per route, each process's memory over time with a trend verdict (benchmarks/soak_memory.py), the
metric series Ray exports, the replicas' own reports of what grew, and score rows written vs expected.
Writes benchmarks/results/soak.json, soak-report.json and soak.md.

Load (closed loop, ``--clients`` workers): identifications by image URI, export status polls, new
exports, review queue reads and assignments, deer listings. Every loop is bounded by the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks import soak_memory
from benchmarks.common import RESULTS, ROOT, bench_settings, fetch_value, serve_app, write_results
from serve_app.diagnostics import TRACE_ENV
from serve_app.keys import create_key
from serve_app.store.db import connect, with_database
from serve_app.store.migrate import apply_migrations

SOAK_DB = "trailcam_soak"
SOAK_REDIS_DB = 13
BBOX = {"x": 0.2, "y": 0.2, "w": 0.5, "h": 0.6}
# Weighted mix of actions per loop iteration.
MIX = {"identify": 50, "status": 25, "review": 10, "deer": 10, "export": 5}


@dataclass
class Site:
    id: int
    camera: int
    deer: list[int]
    queries: list[str]


@dataclass
class Stats:
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    transport_errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    answered: list[tuple[int, int]] = field(default_factory=list)  # (detection_id, profiles at its site)
    jobs: list[str] = field(default_factory=list)


def write_jpeg(root: Path, rel: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(path, quality=90)
    return rel


HISTORY_DAYS = 30
"""Exports cover the 30 days before the soak's day: a fixed history that prepare() writes, so an export costs
the same at the end of an hour as at the start (the detections the load adds are dated today). With exports
over a window that grew with the load, a 60-minute run's exports went from 1,300 to 15,600 rows and 0.2 to
1.5 s each, outran the export workers and left jobs waiting past their start grace."""


def prepare(
    settings: dict[str, Any],
    *,
    sites: int,
    deer: int,
    queries: int,
    review_items: int = 500,
    history_per_day: int = 100,
) -> tuple[str, list[Site]]:
    """A fresh soak database with sites, galleries and query images on disk; returns an all-sites key."""
    dsn = str(settings["database_url"])
    apply_migrations(dsn)
    images = Path(settings["image_root"])
    out = []
    with connect(dsn, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE reid_similarity_scores, review_events, detections, images, deer, cameras, sites, api_keys"
            " RESTART IDENTITY CASCADE"
        )
        for s in range(sites):
            sid = fetch_value(conn, "INSERT INTO sites (name) VALUES (%s) RETURNING id", (f"soak-{s}",))
            cam = fetch_value(
                conn,
                "INSERT INTO cameras (site_id, name, latitude, longitude) VALUES (%s, 'cam', 45.1, -93.2) RETURNING id",
                (sid,),
            )
            ids = []
            for d in range(deer):
                uri = write_jpeg(images, f"soak/gallery/{sid}-{d}.jpg", seed=10_000 * sid + d)
                img = fetch_value(
                    conn,
                    "INSERT INTO images (camera_id, uri, captured_at, width, height) VALUES (%s, %s, now(), 320, 240)"
                    " RETURNING id",
                    (cam, uri),
                )
                did = fetch_value(
                    conn, "INSERT INTO deer (site_id, name) VALUES (%s, %s) RETURNING id", (sid, f"soak-{sid}-{d}")
                )
                conn.execute(
                    "INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h, deer_id, decision)"
                    " VALUES (%s, 0.2, 0.2, 0.5, 0.6, %s, 'manual')",
                    (img, did),
                )
                ids.append(int(did))
            uris = [
                write_jpeg(images, f"soak/query/{sid}-{q}.jpg", seed=99_000 + 1000 * sid + q) for q in range(queries)
            ]
            review_uri = write_jpeg(images, f"soak/review/{sid}.jpg", seed=77_000 + sid)
            conn.execute(  # a review queue the load works through
                "WITH img AS (INSERT INTO images (camera_id, uri, captured_at, width, height)"
                " VALUES (%s, %s, now(), 320, 240) RETURNING id)"
                " INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h, decision, top1_similarity)"
                " SELECT id, 0.2, 0.2, 0.5, 0.6, 'review', 0.5 FROM img, generate_series(1, %s)",
                (cam, review_uri, review_items),
            )
            conn.execute(  # the history exports read: history_per_day detections a day, nobody's gallery
                "WITH img AS (INSERT INTO images (camera_id, uri, captured_at, width, height)"
                " SELECT %s, 'soak/history/' || %s || '-' || d || '.jpg',"
                " date_trunc('day', now()) - make_interval(days => d) + interval '6 hours', 320, 240"
                " FROM generate_series(1, %s) AS d RETURNING id)"
                " INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h, decision)"
                " SELECT img.id, 0.2, 0.2, 0.5, 0.6, 'unassigned' FROM img, generate_series(1, %s)",
                (cam, sid, HISTORY_DAYS, history_per_day),
            )
            out.append(Site(int(sid), int(cam), ids, uris))
        key = create_key(conn, sites=None, pepper="change-me", label="soak")
    return key, out


async def timed(client: httpx.AsyncClient, stats: Stats, route: str, method: str, url: str, **kw: Any) -> Any:
    start = time.perf_counter()
    try:
        resp = await client.request(method, url, **kw)
    except httpx.HTTPError:
        stats.transport_errors[route] += 1
        return None
    stats.latencies_ms[route].append((time.perf_counter() - start) * 1000)
    stats.statuses[route][resp.status_code] += 1
    return resp


async def worker(url: str, key: str, sites: list[Site], stats: Stats, deadline: float, seed: int) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    actions, weights = zip(*MIX.items(), strict=True)
    today = dt.datetime.now(dt.UTC).date()
    # One capture time per query image: an image keeps the camera and time it was first recorded with.
    captured_at = dt.datetime.combine(today, dt.time(6, 30), dt.UTC).isoformat()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        while time.monotonic() < deadline:
            action = rng.choices(actions, weights)[0]
            site = rng.choice(sites)
            if action == "identify":
                body = {
                    "image_uri": rng.choice(site.queries),
                    "camera_id": site.camera,
                    "captured_at": captured_at,
                    "bbox": BBOX,
                }
                resp = await timed(client, stats, "POST /api/detections", "POST", "/api/detections", json=body)
                if resp is not None and resp.status_code == 201:
                    stats.answered.append((int(resp.json()["detection_id"]), len(site.deer)))
            elif action == "status" and stats.jobs:
                await timed(client, stats, "GET /api/exports/{id}", "GET", f"/api/exports/{rng.choice(stats.jobs)}")
            elif action == "export" or action == "status":
                body = {
                    "start_date": (today - dt.timedelta(days=HISTORY_DAYS)).isoformat(),
                    "end_date": (today - dt.timedelta(days=1)).isoformat(),
                    "group_by": rng.choice(["day", "week", "month"]),
                    "format": rng.choice(["csv", "parquet", "json", "camtrap-dp"]),
                }
                resp = await timed(client, stats, "POST /api/exports", "POST", "/api/exports", json=body)
                if resp is not None and resp.status_code == 202:
                    stats.jobs.append(resp.json()["id"])
            elif action == "review":
                resp = await timed(client, stats, "GET /api/review", "GET", "/api/review", params={"limit": 20})
                items = resp.json()["items"] if resp is not None and resp.status_code == 200 else []
                if items:
                    item = rng.choice(items)
                    choice = {"deer_id": rng.choice(site.deer)} if item["site_id"] == site.id else {"unassign": True}
                    await timed(
                        client,
                        stats,
                        "POST /api/detections/{id}/assignment",
                        "POST",
                        f"/api/detections/{item['detection_id']}/assignment",
                        json={**choice, "note": "soak"},
                    )
            else:
                await timed(client, stats, "GET /api/deer", "GET", "/api/deer", params={"site_id": site.id})


def score_rows(dsn: str, answered: list[tuple[int, int]], *, wait_s: float = 60) -> tuple[int, int, int]:
    """(rows written, rows expected, duplicated pairs) for the answered identifications, after flushes land."""
    ids = [a[0] for a in answered]
    expected = sum(a[1] for a in answered)
    deadline = time.monotonic() + wait_s
    written = 0
    with connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            written = int(
                fetch_value(
                    conn,
                    "SELECT count(*) AS n FROM reid_similarity_scores WHERE detection_id = ANY(%s)",
                    (ids,),
                    column="n",
                )
            )
            if written >= expected:
                break
            time.sleep(1.0)
        dupes = int(
            fetch_value(
                conn,
                "SELECT count(*) AS n FROM (SELECT 1 FROM reid_similarity_scores GROUP BY detection_id, deer_id,"
                " model_version, source HAVING count(*) > 1) d",
                column="n",
            )
        )
    return written, expected, dupes


async def final_jobs(url: str, key: str, jobs: list[str], *, wait_s: float = 120) -> dict[str, int]:
    """Every export created ends completed or failed; counts by final status ("stuck" must be 0)."""
    counts: dict[str, int] = defaultdict(int)
    deadline = time.monotonic() + wait_s
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for job in jobs:
            status = "stuck"
            while time.monotonic() < deadline:
                resp = await client.get(f"/api/exports/{job}")
                status = resp.json()["status"] if resp.status_code == 200 else f"http {resp.status_code}"
                if status != "processing":
                    break
                await asyncio.sleep(0.5)
            counts["stuck" if status == "processing" else status] += 1
    return dict(counts)


APP = "trailcam"
REPLICA_DEPLOYMENTS = ("Ingress", "ReID")


def probe(out: list[dict[str, Any]], stop: threading.Event, every_s: float, started: float) -> None:
    """The replicas' own memory reports, now and every ``every_s`` (the first one is their baseline)."""
    while True:
        out.append({"at_s": round(time.monotonic() - started), **soak_memory.replica_reports(APP, REPLICA_DEPLOYMENTS)})
        if stop.wait(every_s):
            return


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Soak: {report['duration_s']:.0f} s of mixed load, {report['clients']} clients",
        "",
        f"- requests: {report['requests']}, errors (5xx or transport): {report['errors']} ({report['error_rate']:.4%})",
        f"- score rows written / expected: {report['score_rows']['written']} / {report['score_rows']['expected']}"
        f" (lost {report['score_rows']['lost']}, duplicated pairs {report['score_rows']['duplicates']})",
        f"- exports by final status: {report['exports']}",
        f"- memory verdict: {report['memory_verdict']}",
        "",
        "| route | requests | p50 ms | p99 ms | statuses |",
        "|---|---:|---:|---:|---|",
    ]
    for route, r in sorted(report["routes"].items()):
        lines.append(f"| {route} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['statuses']} |")
    lines += ["", f"Memory after a warm-up of {report['warmup_s']:.0f} s:", ""]
    lines += soak_memory.markdown_rows(report["memory"])
    series = report["metric_series"]["totals"]
    if series:
        lines += [
            "",
            f"- metric series exported by the nodes: {series[0][1]} at {series[0][0]:.0f} s,"
            f" {series[-1][1]} at {series[-1][0]:.0f} s",
            f"- families that grew: {report['metric_series']['grown_families']}",
        ]
    probes = report["replica_probes"]
    for name in REPLICA_DEPLOYMENTS:
        seen = [p[name] for p in probes if "rss_mib" in p.get(name, {})]
        seen = [p for p in seen if seen and p["pid"] == seen[-1]["pid"]]  # one replica: the one that answered last
        if len(seen) < 2:
            continue
        last = seen[-1]
        lines += [
            "",
            f"{name} replica's own report, first to last probe: RSS {seen[0]['rss_mib']} -> {last['rss_mib']} MiB,"
            f" objects the collector tracks (beyond the {last.get('frozen_objects', '?')} Serve froze at start)"
            f" {seen[0]['objects']} -> {last['objects']}",
        ]
        first_heap, last_heap = seen[0].get("malloc_mib"), last.get("malloc_mib")
        if first_heap and last_heap:
            lines.append(
                "- C heap (glibc mallinfo2), first to last probe:"
                f" in use {first_heap['in_use']} -> {last_heap['in_use']} MiB,"
                f" free but kept {first_heap['free']} -> {last_heap['free']} MiB,"
                f" mmapped {first_heap['mmapped']} -> {last_heap['mmapped']} MiB"
            )
        lines += [f"- {t['type']}: +{t['count_delta']}" for t in last["grown_types"][:8]]
        lines += [f"- {g['size_delta_kib']} KiB in {g['count_delta']} blocks at {' < '.join(reversed(g['traceback']))}"
                  for g in last["grown_lines"][:8]]  # fmt: skip
    return "\n".join(lines) + "\n"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def rejudge(path: Path, *, warmup_s: float | None) -> int:
    """Apply the current memory rules to a saved report (its samples are kept whole) and rewrite soak.md."""
    report = json.loads(path.read_text())
    report["warmup_s"] = report["duration_s"] / 3 if warmup_s is None else warmup_s
    watch = soak_memory.MemoryWatch.from_samples(report["memory_samples"])
    report["memory"] = watch.rows(warmup_s=report["warmup_s"])
    memory_ok, report["memory_verdict"] = soak_memory.verdict(report["memory"])
    path.write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / "soak.md").write_text(markdown(report))
    print(markdown(report))
    data_ok = report["errors"] == 0 and report["score_rows"]["lost"] == 0 and report["score_rows"]["duplicates"] == 0
    return 0 if memory_ok and data_ok and not report["exports"].get("stuck") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--deer", type=int, default=10, help="profiles per site")
    parser.add_argument("--queries", type=int, default=40, help="distinct query images per site")
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--input-size-px", type=int, default=112)
    parser.add_argument(
        "--warmup-s", type=float, default=None, help="memory trends start after this (default: a third of the run)"
    )
    parser.add_argument(
        "--probe-every-s", type=float, default=600.0, help="ask the replicas what grew this often (0: never)"
    )
    parser.add_argument(
        "--trace-memory", type=int, default=0, metavar="FRAMES", help="tracemalloc in the replicas (0: off)"
    )
    parser.add_argument(
        "--rejudge",
        type=Path,
        metavar="REPORT_JSON",
        help="judge a saved soak-report.json's memory samples with the current rules, rewrite soak.md; no load",
    )
    args = parser.parse_args(argv)
    if args.rejudge:
        return rejudge(args.rejudge, warmup_s=args.warmup_s)
    warmup_s = args.duration_s / 3 if args.warmup_s is None else args.warmup_s
    if args.trace_memory:
        os.environ[TRACE_ENV] = str(args.trace_memory)  # the local Ray's workers inherit the driver's environment

    base = bench_settings()
    settings = {
        **base,
        "database_url": with_database(str(base["database_url"]), SOAK_DB),
        "redis_url": str(base["redis_url"]).rsplit("/", 1)[0] + f"/{SOAK_REDIS_DB}",
        "image_root": str(ROOT / ".data" / "soak" / "images"),
        "export_dir": str(ROOT / ".data" / "soak" / "exports"),
        "export_status_ttl_s": 3600,
        "export_task_num_cpus": 0.25,
    }
    key, sites = prepare(settings, sites=args.sites, deer=args.deer, queries=args.queries)
    reid = {
        "architecture": args.architecture,
        "input_size_px": args.input_size_px,
        "num_replicas": 1,
        "num_cpus": 0.5,
        "torch_threads": 1,
    }
    stats = Stats()
    probes: list[dict[str, Any]] = []
    with serve_app({"settings": settings, "reid": reid}) as url:
        stop = threading.Event()
        memory = soak_memory.MemoryWatch()
        series = soak_memory.SeriesWatch(started=memory.started)
        watchers = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in (memory, series)]
        if args.probe_every_s > 0:
            watchers.append(
                threading.Thread(target=probe, args=(probes, stop, args.probe_every_s, memory.started), daemon=True)
            )
        for thread in watchers:
            thread.start()
        started = memory.started
        deadline = started + args.duration_s

        async def drive() -> None:
            await asyncio.gather(*(worker(url, key, sites, stats, deadline, seed=i) for i in range(args.clients)))

        asyncio.run(drive())
        elapsed = time.monotonic() - started
        stop.set()
        for thread in watchers:
            thread.join()
        if args.probe_every_s > 0:
            probes.append(
                {"at_s": round(time.monotonic() - started), **soak_memory.replica_reports(APP, REPLICA_DEPLOYMENTS)}
            )
        exports = asyncio.run(final_jobs(url, key, stats.jobs))
        written, expected, dupes = score_rows(str(settings["database_url"]), stats.answered)

    routes: dict[str, dict[str, Any]] = {}
    requests = errors = 0
    for route, lat in stats.latencies_ms.items():
        codes = dict(sorted(stats.statuses[route].items()))
        n = sum(codes.values()) + stats.transport_errors[route]
        bad = sum(c for s, c in codes.items() if s >= 500) + stats.transport_errors[route]
        requests += n
        errors += bad
        routes[route] = {
            "requests": n,
            "p50_ms": round(statistics.median(lat), 2) if lat else 0.0,
            "p99_ms": round(percentile(lat, 99), 2),
            "errors": bad,
            "statuses": codes,
        }
    trends = memory.rows(warmup_s=warmup_s)
    memory_ok, memory_verdict = soak_memory.verdict(trends)
    report = {
        "duration_s": elapsed,
        "clients": args.clients,
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else 0.0,
        "routes": routes,
        "score_rows": {"written": written, "expected": expected, "lost": expected - written, "duplicates": dupes},
        "exports": exports,
        "warmup_s": warmup_s,
        "memory": trends,
        "memory_verdict": memory_verdict,
        "metric_series": series.report(),
        "replica_probes": probes,
        "memory_samples": {
            f"{memory.labels[pid]} [{pid}]": [[round(t, 1), round(m, 1)] for t, m in points]
            for pid, points in memory.samples.items()
        },
    }
    rows: list[dict[str, Any]] = [
        {"case": "soak", "metric": "error_rate", "value": report["error_rate"], "unit": "ratio", "target": "0"},
        {"case": "soak", "metric": "rows_lost", "value": float(expected - written), "unit": "rows", "target": "0"},
        {"case": "soak", "metric": "rows_dup", "value": float(dupes), "unit": "pairs", "target": "0"},
        {
            "case": "soak",
            "metric": "exports_stuck",
            "value": float(exports.get("stuck", 0)),
            "unit": "jobs",
            "target": "0",
        },
        {
            "case": "soak",
            "metric": "rising_rss",
            "value": float(sum(t["judged"] and t["verdict"] == "rising" for t in trends.values())),
            "unit": "processes",
            "target": "0",
        },
    ]
    for route, r in routes.items():
        rows.append({"case": route, "metric": "p99", "value": r["p99_ms"], "unit": "ms", "target": None})
        rows.append({"case": route, "metric": "requests", "value": float(r["requests"]), "unit": "req", "target": None})
    write_results("soak", rows, meta={k: v for k, v in report.items() if k not in ("memory_samples", "replica_probes")})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak-report.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / "soak.md").write_text(markdown(report))
    print(markdown(report))
    ok = errors == 0 and expected == written and dupes == 0 and memory_ok and not exports.get("stuck")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
