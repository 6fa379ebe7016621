"""Jobs always end: TTL expiry, a killed runner, DELETE racing completion, many concurrent exports."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from serve_app.exports import scripts
from tests import factories
from tests.helpers import auth, export_body, wait_final
from tests.serve_app.exports.conftest import make_dataset
from tests.waiting import wait_until_async


def wait_until(condition: Callable[[], bool], *, what: str, timeout_s: float = 30) -> None:
    """Poll ``condition`` until it holds; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_status_expires_after_the_ttl_and_updates_keep_it(
    tuned_app: Callable[..., str], serve_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    ttl_s = 10  # long enough for the export to end first on a loaded 2-core machine
    url = tuned_app("ttl", export_status_ttl_s=ttl_s)
    make_dataset(db, days=3)
    key = auth(factories.api_key(db))
    with httpx.Client(base_url=serve_url, timeout=30) as warm:  # start Ray workers before the TTL clock runs
        wait_final(warm, warm.post("/api/exports", json=export_body(), headers=key).headers["location"], key)
    with httpx.Client(base_url=url, timeout=30) as client:
        resp = client.post("/api/exports", json=export_body(), headers=key)
        assert resp.status_code == 202
        status_url = "/api/exports/" + resp.json()["id"]
        job_key = scripts.job_key(resp.json()["id"])
        assert 0 < redis_client.pttl(job_key) <= ttl_s * 1000
        expires_at_ms = redis_client.pexpiretime(job_key)
        final = wait_final(client, status_url, headers=key, timeout_s=ttl_s)
        assert final["status"] == "completed"
        assert redis_client.hget(job_key, "worker_pid")  # the runner's updates happened
        assert redis_client.pexpiretime(job_key) == expires_at_ms  # they neither extended nor removed the TTL
        wait_until(lambda: client.get(status_url, headers=key).status_code != 200, what="the status expired")
        gone = client.get(status_url, headers=key)
        assert gone.status_code == 404
        assert gone.headers["content-type"].startswith("application/problem+json")
        assert redis_client.exists(job_key) == 0


def test_sigkill_of_the_runner_ends_failed_without_a_reader(
    tuned_app: Callable[..., str],
    database_url: str,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
) -> None:
    lease_s = 1.0
    url = tuned_app("lease", export_lease_s=lease_s, export_sweep_interval_s=0.25)
    make_dataset(db, days=3)
    key = auth(factories.api_key(db))
    with psycopg.connect(database_url) as blocker, httpx.Client(base_url=url, timeout=30) as client:
        blocker.execute("LOCK TABLE detections IN ACCESS EXCLUSIVE MODE")  # the runner blocks mid-job
        resp = client.post("/api/exports", json=export_body("parquet"), headers=key)
        job_key = scripts.job_key(resp.json()["id"])
        wait_until(lambda: bool(redis_client.hget(job_key, "worker_pid")), what="the runner started")
        pid = int(redis_client.hget(job_key, "worker_pid") or 0)
        first_lease_ms = int(redis_client.hget(job_key, "lease_until_ms") or 0)

        def renewed_past_two_leases() -> bool:
            return int(redis_client.hget(job_key, "lease_until_ms") or 0) > first_lease_ms + 2000 * lease_s

        # Alive and blocked: the heartbeat keeps renewing the lease, and the job stays processing.
        wait_until(renewed_past_two_leases, what="the blocked runner renewed its lease past two leases")
        assert redis_client.hget(job_key, "status") == "processing"
        os.kill(pid, signal.SIGKILL)
        # No reader polls the API here: the sweeper alone must end the job.
        wait_until(lambda: redis_client.hget(job_key, "status") != "processing", what="the sweeper ended the job")
        blocker.rollback()
        assert redis_client.hget(job_key, "status") == "failed"
        body = client.get("/api/exports/" + resp.json()["id"], headers=key).json()
        assert body["status"] == "failed" and body["error"] == "export worker lost"


def test_delete_racing_completion_never_leaves_a_job_or_file(
    serve_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    make_dataset(db, days=2)
    key = auth(factories.api_key(db))
    rng = random.Random(3)
    delays = [rng.uniform(0, 0.6) for _ in range(100)]

    def race(delay: float) -> tuple[str, str, int]:
        with httpx.Client(base_url=serve_url, timeout=30) as client:
            resp = client.post("/api/exports", json=export_body(rng.choice(["csv", "camtrap-dp"])), headers=key)
            job_id = resp.json()["id"]
            file_uri = redis_client.hget(scripts.job_key(job_id), "file_uri") or ""
            time.sleep(delay)
            return job_id, file_uri, client.delete(f"/api/exports/{job_id}", headers=key).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(race, delays))
    assert {status for _, _, status in results} == {204}
    files = [Path(uri) for _, uri, _ in results]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p.exists() or Path(f"{p}.part").exists() for p in files):
        time.sleep(0.2)
    assert [p for p in files if p.exists() or Path(f"{p}.part").exists()] == []
    assert job_keys_left(redis_client) == []
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        assert {client.get(f"/api/exports/{job_id}", headers=key).status_code for job_id, _, _ in results} == {404}


def job_keys_left(client: redis.Redis) -> list[str]:
    return [str(k) for k in client.scan_iter(scripts.JOB_PREFIX + "*")]


POLL_WINDOW = 64


async def _many(url: str, key: dict[str, str], count: int, timeout_s: float) -> tuple[dict[str, int], list[str]]:
    """POST ``count`` exports at once and poll them to their end; returns counts by status and the errors."""
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        posts = await asyncio.gather(
            *(
                client.post("/api/exports", json=export_body(["csv", "json", "parquet"][i % 3]), headers=key)
                for i in range(count)
            )
        )
        refused = [f"{r.status_code} {r.text[:300]}" for r in posts if r.status_code != 202]
        assert not refused, f"{len(refused)} of {count} POSTs refused: {refused[:5]}"
        pending = [r.json()["id"] for r in posts]  # in the order they were sent
        final: dict[str, str] = {}
        errors: list[str] = []

        async def all_ended() -> bool:
            # The oldest jobs first, POLL_WINDOW at a time: polling every pending job each round would put a
            # thousand GETs a round on the cores the exports run on. A job past the window is asked later.
            answers = await asyncio.gather(
                *(client.get(f"/api/exports/{i}", headers=key) for i in pending[:POLL_WINDOW])
            )
            for answer in answers:
                body = answer.json()
                if body["status"] != "processing":
                    final[body["id"]] = body["status"]
                    if body.get("error"):
                        errors.append(body["error"])
            pending[:] = [i for i in pending if i not in final]
            return not pending

        await wait_until_async(all_ended, what=f"all {count} exports to leave processing", timeout_s=timeout_s,
                               every_s=0.2)  # fmt: skip
    counts: dict[str, int] = {}
    for status in final.values():
        counts[status] = counts.get(status, 0) + 1
    return counts, errors


def test_200_concurrent_exports_all_end(serve_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis) -> None:
    make_dataset(db, days=2)
    counts, errors = asyncio.run(_many(serve_url, auth(factories.api_key(db)), 200, timeout_s=150))
    assert sum(counts.values()) == 200
    assert set(counts) <= {"completed", "failed"}
    assert counts.get("completed", 0) == 200, f"{counts}; errors: {sorted(set(errors))[:5]}"


@pytest.mark.slow
def test_1000_concurrent_exports_all_end(
    serve_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    make_dataset(db, days=2)
    counts, _errors = asyncio.run(_many(serve_url, auth(factories.api_key(db)), 1000, timeout_s=600))
    assert sum(counts.values()) == 1000
    assert set(counts) <= {"completed", "failed"}
