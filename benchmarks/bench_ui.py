"""The web UI: the review page beside the same data through the API, and what each page weighs.

1. ``GET /ui/review`` (signed in through the form, the session cookie sent by wrk) beside
   ``GET /api/review?limit=1&k=5`` (bearer key) on the same app and data, p50/p99 and req/s at 1 and 8
   connections in alternating rounds, on bare uvicorn and through Serve (target: the page's p50 < 100 ms
   through Serve), and the page's p50 over the API's.
2. Page weight: each UI page that answers 200, its HTML plus every script and stylesheet it references
   (images excluded), in kB of 1,000 bytes as served (target < 150 kB).

The data is demo-sized, in its own site of the benchmark database ('bench-ui', created once): four cameras,
40 profiles each pictured by a manual detection, 3,000 detections of which 300 wait in the review band with
five scored online candidates each. The keys are limited to that site, so other benchmarks' data in the same
database never reaches the queue.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import random
import re
import statistics
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from benchmarks.common import (
    HttpCase,
    Interleaved,
    Row,
    api_app_args,
    bench_settings,
    fetch_value,
    http_rows,
    prepare_database,
    serve_app,
    uvicorn_app,
    write_results,
)
from serve_app.config import Settings
from serve_app.keys import create_key
from serve_app.store.db import connect
from serve_app.web.ui.session import COOKIE_NAME

SITE = "bench-ui"
MODEL = "bench-ui-model"
ACCEPT = 0.75
CAMERAS = 4
PROFILES = 40
DETECTIONS = 3000
REVIEW_BAND = 300
CANDIDATES = 5
AUTO_SHARE = 0.7
"""Of the detections outside the review band and the profiles' own, the share accepted automatically."""
CONNECTIONS = (1, 8)
PAGE_PATH = "/ui/review"
API_PATH = f"/api/review?limit=1&k={CANDIDATES}"  # what the page asks the API for, its first item
PAGES = ("/ui/login", "/ui/review", "/ui/deer", "/ui/exports", "/ui/reports")
PAGE_P50 = "< 100 ms"
PAGE_WEIGHT = "< 150 kB"

DETECTIONS_SQL = """
WITH planned AS (
    SELECT * FROM unnest(%(uri)s::text[], %(camera)s::bigint[], %(captured)s::timestamptz[], %(deer)s::bigint[],
                         %(decision)s::text[], %(top1)s::float8[])
        AS p(uri, camera_id, captured_at, deer_id, decision, top1)
), image AS (
    INSERT INTO images (camera_id, uri, captured_at, width, height)
    SELECT camera_id, uri, captured_at, 1280, 720 FROM planned RETURNING id, uri
)
INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h, confidence, deer_id, decision, top1_similarity,
                        model_version)
SELECT image.id, 0.3, 0.25, 0.3, 0.45, 0.9, p.deer_id, p.decision, p.top1,
       CASE WHEN p.decision = 'manual' THEN NULL ELSE %(model)s END
FROM planned p JOIN image USING (uri)
RETURNING id, deer_id, decision, top1_similarity
"""
ANALYZE_SQL = "ANALYZE sites, cameras, images, deer, detections, reid_similarity_scores"
SCORES_COPY = (
    "COPY reid_similarity_scores (detection_id, deer_id, similarity, rank, threshold, matched, model_version, source)"
    " FROM STDIN"
)


def _plan(cameras: list[int], deer: list[int], rng: random.Random) -> dict[str, list[Any]]:
    """One image and detection per row: each profile's manual one, the review band, then auto and unassigned."""
    now = dt.datetime.now(dt.UTC)
    plan: dict[str, list[Any]] = {name: [] for name in ("uri", "camera", "captured", "deer", "decision", "top1")}
    for n in range(DETECTIONS):
        if n < PROFILES:
            deer_id, decision, top1 = deer[n], "manual", None
        elif n < PROFILES + REVIEW_BAND:
            deer_id, decision, top1 = None, "review", rng.uniform(0.55, ACCEPT - 0.001)
        elif rng.random() < AUTO_SHARE:
            deer_id, decision, top1 = rng.choice(deer), "auto", rng.uniform(ACCEPT, 0.95)
        else:
            deer_id, decision, top1 = None, "unassigned", rng.uniform(0.2, 0.55)
        plan["uri"].append(f"{SITE}/frame-{n:05d}.jpg")
        plan["camera"].append(cameras[n % len(cameras)])
        plan["captured"].append(now - dt.timedelta(minutes=rng.uniform(0, 30 * 24 * 60)))
        plan["deer"].append(deer_id)
        plan["decision"].append(decision)
        plan["top1"].append(top1)
    return plan


def _scores(detection: Mapping[str, Any], deer: list[int], rng: random.Random) -> Iterator[tuple[Any, ...]]:
    """The detection's online candidates, best first: its own profile first when it was accepted."""
    first = [detection["deer_id"]] if detection["decision"] == "auto" else []
    ranked = first + rng.sample([d for d in deer if d not in first], CANDIDATES - len(first))
    similarity = float(detection["top1_similarity"])
    for rank, deer_id in enumerate(ranked, start=1):
        matched = rank == 1 and detection["decision"] == "auto"
        yield detection["id"], deer_id, similarity, rank, ACCEPT, matched, MODEL, "online"
        similarity -= rng.uniform(0.01, 0.08)


def demo_site(dsn: str, *, seed: int = 7) -> int:
    """The 'bench-ui' site's id, its demo-sized data created in one transaction the first time."""
    with connect(dsn) as conn:
        found = conn.execute("SELECT id FROM sites WHERE name = %s", (SITE,)).fetchone()
        if found is not None:
            return int(found["id"])
        rng = random.Random(seed)
        site = int(fetch_value(conn, "INSERT INTO sites (name) VALUES (%s) RETURNING id", (SITE,)))
        cameras = [
            int(r["id"])
            for r in conn.execute(
                "INSERT INTO cameras (site_id, name, latitude, longitude)"
                " SELECT %s, 'cam' || lpad(n::text, 2, '0'), 45.1, -93.2 FROM generate_series(1, %s) n RETURNING id",
                (site, CAMERAS),
            )
        ]
        deer = [
            int(r["id"])
            for r in conn.execute(
                "INSERT INTO deer (site_id, name, sex)"
                " SELECT %s, 'Deer ' || n, 'unknown' FROM generate_series(1, %s) n RETURNING id",
                (site, PROFILES),
            )
        ]
        detections = conn.execute(DETECTIONS_SQL, {**_plan(cameras, deer, rng), "model": MODEL}).fetchall()
        with conn.cursor().copy(SCORES_COPY) as copy:
            for detection in detections:
                if detection["decision"] != "manual":
                    for row in _scores(detection, deer, rng):
                        copy.write_row(row)
    return site


def sign_in(base_url: str, key: str) -> str:
    """Sign in through the form as a browser does; the ``Cookie`` header value of the session."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        form = client.get("/ui/login")
        token = re.search(r'name="login_token" value="([^"]*)"', form.text)
        if form.status_code != 200 or token is None:
            raise RuntimeError(f"GET /ui/login answered {form.status_code} without a login_token")
        done = client.post("/ui/login", data={"api_key": key, "login_token": token.group(1), "next": PAGE_PATH})
        cookie = done.cookies.get(COOKIE_NAME)
        if done.status_code != 303 or not cookie:
            raise RuntimeError(f"sign-in answered {done.status_code}: {done.text[:200]}")
    return f"{COOKIE_NAME}={cookie}"


def check_review_page(base_url: str, cookie: str) -> None:
    """The page wrk will load shows a queue item with its candidates (wrk would count a redirect to sign-in as
    a success)."""
    page = httpx.get(base_url + PAGE_PATH, headers={"Cookie": cookie}, timeout=30)
    shown = page.text.count('class="candidate"')
    if page.status_code != 200 or shown != CANDIDATES:
        raise RuntimeError(f"{PAGE_PATH} answered {page.status_code} with {shown} candidates, not {CANDIDATES}")


def alternate(
    sides: Mapping[str, tuple[str, HttpCase]], *, rounds: int, duration_s: float, connections: int
) -> Interleaved:
    """common.interleaved_load for sides that differ in request (path, credentials) as well as server: round i
    of every side runs back to back."""
    out: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, (url, case) in sides.items():
            out[name].append(case.load(url, connections=connections, duration_s=duration_s))
    return Interleaved(out)


def page_vs_api(servers: Mapping[str, str], key: str, *, target_server: str, rounds: int, round_s: float) -> list[Row]:
    """The review page and its API call on every server at 1 and 8 connections; the page's p50 over the API's."""
    sides: dict[str, tuple[str, HttpCase]] = {}
    for server, url in servers.items():
        cookie = sign_in(url, key)
        check_review_page(url, cookie)
        sides[f"page {server}"] = (url, HttpCase(f"GET {PAGE_PATH}", PAGE_PATH, headers={"Cookie": cookie}))
        sides[f"api {server}"] = (
            url,
            HttpCase(f"GET {API_PATH}", API_PATH, headers={"Authorization": f"Bearer {key}"}),
        )
    for url, case in sides.values():  # warm-up
        case.load(url, connections=4, duration_s=1)
    rows: list[Row] = []
    for conns in CONNECTIONS:
        measured = alternate(sides, rounds=rounds, duration_s=round_s, connections=conns)
        for server in servers:
            page, api = measured.rounds[f"page {server}"], measured.rounds[f"api {server}"]
            target = {"p50": PAGE_P50} if server == target_server else None
            rows += http_rows(f"GET {PAGE_PATH} {server} c={conns}", measured.median(f"page {server}"), targets=target)
            rows += http_rows(f"GET {API_PATH} {server} c={conns}", measured.median(f"api {server}"))
            ratio = statistics.median(p["p50_ms"] / max(a["p50_ms"], 1e-9) for p, a in zip(page, api, strict=True))
            rows.append(
                {
                    "case": f"page/API {server} c={conns}",
                    "metric": "p50 ratio",
                    "value": ratio,
                    "unit": "x",
                    "target": None,
                }
            )
    return rows


class _Assets(HTMLParser):
    """The scripts and stylesheets a page references, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.urls.append(str(found["src"]))
        elif tag == "link" and "stylesheet" in (found.get("rel") or "").lower().split() and found.get("href"):
            self.urls.append(str(found["href"]))


def page_weights(base_url: str, cookie: str) -> tuple[list[Row], dict[str, Any]]:
    """Each page that answers 200 with its scripts and stylesheets (fetched once per page); the breakdown."""
    rows: list[Row] = []
    detail: dict[str, Any] = {}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for path in PAGES:
            page = client.get(path, headers={} if path == "/ui/login" else {"Cookie": cookie})
            if page.status_code != 200:
                detail[path] = {"status": page.status_code, "measured": False}
                continue
            parser = _Assets()
            parser.feed(page.text)
            files = {path: page.content}
            for src in dict.fromkeys(parser.urls):
                url = urljoin(base_url + path, src)
                if urlsplit(url).netloc != urlsplit(base_url).netloc:
                    raise RuntimeError(f"{path} loads {url} from another origin")
                asset = client.get(url)
                if asset.status_code != 200:
                    raise RuntimeError(f"{path} references {src}, which answered {asset.status_code}")
                files[urlsplit(url).path] = asset.content
            total = sum(len(body) for body in files.values())
            detail[path] = {
                "bytes": {name: len(body) for name, body in files.items()},
                "gzip_bytes": sum(len(gzip.compress(body)) for body in files.values()),
            }
            rows.append(
                {
                    "case": f"GET {path} + {len(files) - 1} scripts/styles",
                    "metric": "weight",
                    "value": total / 1000,
                    "unit": "kB",
                    "target": PAGE_WEIGHT,
                }
            )
    return rows, detail


def main(argv: list[str] | None = None) -> None:
    """Demo-sized data, both servers up, the page beside the API in alternating rounds, then page weights."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per connection count")
    parser.add_argument("--round-s", type=float, default=3.0, help="seconds of wrk load per side per round")
    parser.add_argument(
        "--no-serve", action="store_true", help="bare uvicorn only (no Ray); the target moves to its page rows"
    )
    args = parser.parse_args(argv)
    settings = bench_settings()
    prepare_database(settings)
    site = demo_site(str(settings["database_url"]))
    with connect(str(settings["database_url"]), autocommit=True) as conn:
        # Planner statistics as autovacuum keeps them (this machine's Postgres runs with it off): without them the
        # queue's query scans the top-1 index once per review item.
        conn.execute(ANALYZE_SQL)
        key = create_key(conn, sites=[site], pepper=Settings().key_pepper, label=SITE)
    with ExitStack() as stack:
        servers = {"uvicorn": stack.enter_context(uvicorn_app(settings))}
        if not args.no_serve:
            servers["serve"] = stack.enter_context(serve_app(api_app_args(settings)))
        target_server = "uvicorn" if args.no_serve else "serve"
        rows = page_vs_api(servers, key, target_server=target_server, rounds=args.rounds, round_s=args.round_s)
        weights, detail = page_weights(servers["uvicorn"], sign_in(servers["uvicorn"], key))
    write_results(
        "ui",
        rows + weights,
        meta={
            "data": {"site": SITE, "profiles": PROFILES, "detections": DETECTIONS, "review_band": REVIEW_BAND},
            "target_server": target_server,
            "pages": detail,
        },
    )


if __name__ == "__main__":
    main()
