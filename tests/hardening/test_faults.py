"""Faults: Redis and Postgres restarts, a ReID replica killed under load, an unusable export directory.

Each scenario runs its own Serve app against private servers (tests/fixtures/private_services.py), so
the machine's shared Redis and Postgres are never stopped. The export runner's lost node (its worker
SIGKILLed mid-job, the job failed through its lease) is covered in
tests/serve_app/exports/test_resilience.py::test_sigkill_of_the_runner_ends_failed_within_two_leases.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from ray import serve

from serve_app.exports import scripts
from serve_app.store.db import connect
from tests import factories
from tests.fixtures.private_services import PrivateRedis
from tests.hardening.conftest import Deployed, PgHandle, make_site
from tests.helpers import auth, export_body, score_duplicates, wait_final

PROBLEM = "application/problem+json"
FORMATS = ("csv", "parquet", "json", "camtrap-dp")


def assert_problem(resp: httpx.Response, status: int) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
    body = resp.json()
    assert body["status"] == status and body["type"] and body["title"] and body["detail"]


def test_redis_down_is_a_503_problem_not_a_500(database_url: str, db: psycopg.Connection[Any], tmp_path: Path) -> None:
    """The app alone (ASGI, no Serve) against a Redis port nothing listens on: export routes answer 503."""
    from serve_app.ingress import create_app
    from tests.fixtures.ray_cluster import app_settings, free_port

    app = create_app(app_settings(database_url, f"redis://127.0.0.1:{free_port()}/0", tmp_path))
    key = auth(factories.api_key(db))
    asyncio.run(_redis_down_requests(app, key))


async def _redis_down_requests(app: Any, key: dict[str, str]) -> None:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for resp in (
                await client.get("/api/exports/0123456789abcdef0123456789abcdef", headers=key),
                await client.post("/api/exports", json=export_body(), headers=key),
                await client.delete("/api/exports/0123456789abcdef0123456789abcdef", headers=key),
            ):
                assert_problem(resp, 503)
                assert resp.json()["services"] == ["redis"] and resp.headers["retry-after"]


def wait_started(client: redis.Redis, job_ids: list[str], *, timeout_s: float = 60) -> None:
    """Until every runner has claimed its job (recorded its PID)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(client.hget(scripts.job_key(j), "worker_pid") for j in job_ids):
            return
        time.sleep(0.05)
    raise AssertionError("the export runners never started")


def one_line_error(job: dict[str, Any]) -> None:
    if job["status"] == "failed":
        assert job["error"] and "\n" not in job["error"] and "Traceback" not in job["error"], job


@pytest.mark.timeout(240)
def test_redis_restart_answers_503_while_down_and_in_flight_exports_end(
    deploy: Callable[..., Deployed],
    database_url: str,
    db: psycopg.Connection[Any],
    persistent_redis: PrivateRedis,
) -> None:
    app = deploy(
        "fault-redis",
        database_url=database_url,
        redis_url=persistent_redis.url,
        export_lease_s=1.0,
        export_sweep_interval_s=0.25,
    )
    site = make_site(db, app.images)
    key = site.headers()
    jobs_redis = redis.Redis.from_url(persistent_redis.url, decode_responses=True)
    with psycopg.connect(database_url) as blocker, httpx.Client(base_url=app.url, timeout=30) as client:
        blocker.execute("LOCK TABLE detections IN ACCESS EXCLUSIVE MODE")  # runners block mid-job
        ids = []
        for fmt in FORMATS:
            resp = client.post("/api/exports", json=export_body(fmt), headers=key)
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])
        wait_started(jobs_redis, ids)

        persistent_redis.stop()
        assert_problem(client.get(f"/api/exports/{ids[0]}", headers=key), 503)
        assert_problem(client.post("/api/exports", json=export_body(), headers=key), 503)
        assert_problem(client.delete(f"/api/exports/{ids[1]}", headers=key), 503)
        assert_problem(client.get(f"/api/exports/{ids[2]}/download", headers=key), 503)
        assert client.get("/readyz").status_code == 503
        blocker.rollback()  # runners go on and finish while Redis is still down
        assert client.get("/api/deer", headers=key).status_code == 200  # Postgres-only routes keep working
        time.sleep(2.0)
        persistent_redis.start()

        finals = [wait_final(client, f"/api/exports/{j}", key, timeout_s=60, unavailable_ok=True) for j in ids]
    assert {f["status"] for f in finals} <= {"completed", "failed"}
    for job in finals:
        one_line_error(job)
    # A job that ended completed serves its file; a failed one left no file behind.
    with httpx.Client(base_url=app.url, timeout=30) as client:
        for job in finals:
            download = client.get(f"/api/exports/{job['id']}/download", headers=key)
            assert download.status_code == (200 if job["status"] == "completed" else 409), download.text
        time.sleep(0.5)
        leftovers = {p.name.split(".")[0] for p in (app.root / "exports").glob("*")}
        assert not leftovers & {f["id"] for f in finals if f["status"] == "failed"}
        # And the service is whole again: a new export completes.
        resp = client.post("/api/exports", json=export_body("csv"), headers=key)
        assert resp.status_code == 202
        assert wait_final(client, resp.headers["location"], key, unavailable_ok=True)["status"] == "completed"
    jobs_redis.close()


def _identify_loop(url: str, site: Any, uris: list[str], stop: threading.Event, out: list[httpx.Response]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        i = 0
        while not stop.is_set():
            out.append(client.post("/api/detections", json=site.body(uris[i % len(uris)]), headers=site.headers()))
            i += 1


def check_identifications(responses: list[httpx.Response]) -> list[int]:
    """Every answer is 201 or a 503 problem+json; returns the detection ids that were answered."""
    ids = []
    for resp in responses:
        if resp.status_code == 201:
            ids.append(int(resp.json()["detection_id"]))
        else:
            assert_problem(resp, 503)
    return ids


def wait_score_rows(conn: psycopg.Connection[Any], ids: list[int], expected: int, *, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    n = -1
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(*) AS n FROM reid_similarity_scores WHERE detection_id = ANY(%s)", (ids,)
        ).fetchone()
        assert row is not None
        n = int(row["n"])
        if n >= expected:
            break
        time.sleep(0.3)
    return n


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_postgres_restart_during_identifications_and_exports(
    deploy: Callable[..., Deployed], private_db: PgHandle, private_redis: Any
) -> None:
    pg = private_db.server
    app = deploy("fault-pg", database_url=pg.url, redis_url=private_redis.url, export_lease_s=1.0)
    site = make_site(private_db.conn, app.images, k=3)
    uris = [*site.uris, f"gallery/{site.id}-0.jpg"]
    key = site.headers()
    stop = threading.Event()
    responses: list[httpx.Response] = []
    with httpx.Client(base_url=app.url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        warm = client.post("/api/detections", json=site.body(uris[0]), headers=key)
        assert warm.status_code == 201, warm.text
        blocker = psycopg.connect(pg.url)
        blocker.execute("LOCK TABLE detections IN ACCESS EXCLUSIVE MODE")
        ids = [
            client.post("/api/exports", json=export_body(f), headers=key).json()["id"] for f in ("csv", "camtrap-dp")
        ]
        wait_started(redis.Redis.from_url(private_redis.url, decode_responses=True), ids)
        blocker.rollback()
        futures = [pool.submit(_identify_loop, app.url, site, uris, stop, responses) for _ in range(2)]
        time.sleep(2.0)
        blocker.execute("LOCK TABLE detections IN ACCESS EXCLUSIVE MODE")  # pin new exports mid-run
        more = [client.post("/api/exports", json=export_body(f), headers=key).json()["id"] for f in ("json", "parquet")]
        wait_started(redis.Redis.from_url(private_redis.url, decode_responses=True), more)
        before = len(responses)
        pg.stop(mode="immediate")  # every connection, the runners' included, is cut
        blocker.close()
        time.sleep(4.0)
        down_export = client.post("/api/exports", json=export_body(), headers=key)
        pg.start()
        time.sleep(6.0)
        stop.set()
        for f in futures:
            f.result()
        assert_problem(down_export, 503)
        finals = [wait_final(client, f"/api/exports/{j}", key, timeout_s=60, unavailable_ok=True) for j in ids + more]
        after = client.post("/api/detections", json=site.body(uris[1]), headers=key)
    assert after.status_code == 201, after.text
    answered = check_identifications(responses)
    # Requests sent while it was down answer 503 (some only after the pool's 5 s timeout).
    assert any(r.status_code == 503 for r in responses[before:]), "Postgres was down, yet nothing failed?"
    assert any(r.status_code == 201 for r in responses[-5:]), "identification never recovered"
    assert {f["status"] for f in finals} <= {"completed", "failed"}
    for job in finals:
        one_line_error(job)
    # Detections that were answered are stored, and each has one score row per profile: none lost, none twice.
    answered.append(int(after.json()["detection_id"]))
    with connect(pg.url, autocommit=True) as conn:  # the fixture's connection died with the restart
        stored = conn.execute("SELECT count(*) AS n FROM detections WHERE id = ANY(%s)", (answered,)).fetchone()
        assert stored is not None and stored["n"] == len(answered)
        expected = len(answered) * len(site.deer)
        assert wait_score_rows(conn, answered, expected) == expected
        assert score_duplicates(conn, source="online") == 0


def replica_pids(app_name: str, *, calls: int = 12) -> set[int]:
    handle = serve.get_deployment_handle("ReID", app_name=app_name)
    return {int(handle.describe.remote().result(timeout_s=30)["pid"]) for _ in range(calls)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reid_replica_killed_under_load_is_replaced_without_duplicate_scores(
    deploy: Callable[..., Deployed], database_url: str, redis_url: str, db: psycopg.Connection[Any]
) -> None:
    app = deploy("fault-replica", database_url=database_url, redis_url=redis_url, reid={"num_replicas": 2})
    site = make_site(db, app.images, k=4)
    deadline = time.monotonic() + 90
    while len(pids := replica_pids(app.name)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(pids) == 2, pids
    victim = min(pids)
    stop = threading.Event()
    responses: list[httpx.Response] = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_identify_loop, app.url, site, site.uris, stop, responses) for _ in range(4)]
        time.sleep(3.0)
        os.kill(victim, signal.SIGKILL)
        killed_at = len(responses)
        time.sleep(8.0)
        stop.set()
        for f in futures:
            f.result()
    answered = check_identifications(responses)
    assert len(answered) > killed_at > 0
    assert any(r.status_code == 201 for r in responses[killed_at:]), "the surviving replica stopped answering"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replica_pids(app.name)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(1.0)
    assert len(now) == 2 and victim not in now, f"Serve did not replace replica {victim}: {now}"
    stored = db.execute("SELECT count(*) AS n FROM detections WHERE id = ANY(%s)", (answered,)).fetchone()
    assert stored is not None and stored["n"] == len(answered)  # every answered detection was kept
    assert score_duplicates(db, source="online") == 0
    expected = len(answered) * len(site.deer)
    rows = wait_score_rows(db, answered, expected, timeout_s=10)
    # Score rows commit with their detections, so an answered identification never leaves rows behind
    # in a dead replica's memory.
    print(f"replica kill: {len(answered)} identifications, {rows}/{expected} score rows")
    assert rows == expected


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, check=False)
    return proc.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, check=False)


@pytest.mark.timeout(240)
def test_unwritable_or_full_export_directory_fails_the_job_with_a_clear_message(
    deploy: Callable[..., Deployed], database_url: str, redis_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    holder = tmp_path / "store"
    holder.mkdir()
    export_dir = holder / "exports"
    app = deploy(
        "fault-disk", database_url=database_url, redis_url=redis_url, export_dir=str(export_dir), export_lease_s=2.0
    )
    site = make_site(db, app.images, days=1)
    cam = site.camera
    db.execute(  # enough observations that the Camtrap DP package outgrows a tiny disk
        "WITH img AS (INSERT INTO images (camera_id, uri, captured_at, width, height)"
        " SELECT %s, 'bulk/' || g || '.jpg', now() - interval '1 hour' * g, 1280, 720 FROM generate_series(1, 400) g"
        " RETURNING id) INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h, decision)"
        " SELECT id, 0.1, 0.1, 0.2, 0.2, 'unassigned' FROM img",
        (cam,),
    )
    key = site.headers()
    outcomes: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=app.url, timeout=30) as client:

        def run(fmt: str) -> dict[str, Any]:
            resp = client.post("/api/exports", json=export_body(fmt), headers=key)
            assert resp.status_code == 202, resp.text
            return wait_final(client, resp.headers["location"], key, unavailable_ok=True)

        export_dir.write_text("a file where the export folder should be")
        outcomes["not a directory"] = run("csv")
        export_dir.unlink()
        mounted = []
        try:
            if _mount_tmpfs(export_dir, "ro,size=64k"):
                mounted.append("read-only")
                outcomes["read-only"] = run("csv")
                _umount(export_dir)
            if _mount_tmpfs(export_dir, "size=8k"):
                mounted.append("full")
                outcomes["full"] = run("camtrap-dp")
                assert not [p for p in export_dir.iterdir()], "a partial file was left on the full disk"
                _umount(export_dir)
        finally:
            _umount(export_dir)
        shutil.rmtree(export_dir, ignore_errors=True)
        outcomes["writable again"] = run("csv")
    for name, job in outcomes.items():
        print(f"export dir {name}: {job['status']}: {job['error']}")
    assert outcomes.pop("writable again")["status"] == "completed"
    for name, job in outcomes.items():
        assert job["status"] == "failed", (name, job)
        one_line_error(job)
        assert job["download_url"] is None
    assert "Not a directory" in outcomes["not a directory"]["error"] or "exists" in outcomes["not a directory"]["error"]
    if "read-only" in outcomes:
        assert "Read-only file system" in outcomes["read-only"]["error"]
    if "full" in outcomes:
        assert "No space left on device" in outcomes["full"]["error"]
    if not mounted:
        pytest.skip("tmpfs mounts are not permitted here: only the not-a-directory case ran")
