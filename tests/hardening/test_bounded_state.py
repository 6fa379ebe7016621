"""Per-entity state in long-lived replicas stays at its bound however many distinct keys, tokens, export ids and
sites pass through (a replica runs for weeks): thousands of requests through one ingress replica, then the
replicas' own reports of their bounded caches (serve_app/caching.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
import redis
from ray import serve

from serve_app.exports.scripts import ACTIVE_KEY, IDEMPOTENCY_PREFIX, job_key
from serve_app.keys import new_key
from tests import factories
from tests.hardening.conftest import Deployed, make_site
from tests.helpers import auth, export_body, wait_final
from tests.waiting import wait_until

BOUND = 40
EXPORT_BOUND = 10
GALLERY_BOUND = 2


def bounded(app: Deployed, deployment: str) -> dict[str, dict[str, Any]]:
    """The replica's bounded caches by name (its memory report through a Serve handle)."""
    handle = serve.get_deployment_handle(deployment, app_name=app.name)
    report = handle.memory_report.remote(top=0).result(timeout_s=60)
    names = [c["name"] for c in report["bounded"]]
    assert len(names) == len(set(names)), names  # one cache per name in a replica
    return {c["name"]: c for c in report["bounded"]}


async def gather_limited(calls: list[Callable[[], Any]], *, concurrency: int = 32) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Any]) -> Any:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


@pytest.mark.slow
def test_distinct_keys_tokens_export_ids_and_sites_leave_each_cache_at_its_bound(
    deploy: Callable[..., Deployed], database_url: str, redis_url: str, db: psycopg.Connection[Any]
) -> None:
    app = deploy(
        "bounded",
        database_url=database_url,
        redis_url=redis_url,
        key_cache_s=600.0,  # long enough that only the size bound can empty the caches during the test
        key_cache_max_entries=BOUND,
        export_tracked_max=EXPORT_BOUND,
        export_task_num_cpus=2.0,  # a few running at once; the rest wait in Ray's queue, still tracked
        reid={"gallery_cache_sites": GALLERY_BOUND},
    )
    sites = [make_site(db, app.images, k=1, days=1) for _ in range(GALLERY_BOUND + 2)]
    site = sites[0]
    keys = [factories.api_key(db, sites=[site.id]) for _ in range(3 * BOUND)]
    tokens = [new_key() for _ in range(1500)]  # well formed, never created
    missing_jobs = [str(uuid.uuid4()) for _ in range(1000)]

    async def phase_one() -> list[int]:
        async with httpx.AsyncClient(base_url=app.url, timeout=60) as client:

            def get(path: str, key: str) -> Callable[[], Any]:
                return lambda: client.get(path, headers=auth(key))

            calls = [get(f"/api/deer?site_id={site.id}", k) for k in keys for _ in range(2)]
            calls += [get("/api/deer", t) for t in tokens]
            calls += [get(f"/api/exports/{j}", site.key) for j in missing_jobs]
            calls += [
                lambda s=s: client.post("/api/detections", json=s.body(s.uris[0]), headers=s.headers())
                for s in sites
                for _ in range(2)
            ]
            return [r.status_code for r in await gather_limited(calls)]

    codes = asyncio.run(phase_one())
    expected = [200] * (2 * len(keys)) + [401] * len(tokens) + [404] * len(missing_jobs) + [201] * (2 * len(sites))
    assert codes == expected
    caches = bounded(app, "Ingress")
    assert caches["api keys verified"]["entries"] == BOUND
    assert caches["api keys verified"]["evicted"] >= len(keys) - BOUND
    assert caches["api keys refused"]["entries"] == BOUND
    assert caches["api keys refused"]["evicted"] >= len(tokens) - BOUND
    galleries = bounded(app, "ReID")["site galleries"]
    assert galleries["entries"] == GALLERY_BOUND
    assert galleries["evicted"] >= len(sites) - GALLERY_BOUND

    # Exports with distinct Idempotency-Keys, held running (their query waits on a lock) until all are in.
    n_exports = 3 * EXPORT_BOUND
    with psycopg.connect(database_url) as blocker, httpx.Client(base_url=app.url, timeout=60) as client:
        blocker.execute("LOCK TABLE detections IN ACCESS EXCLUSIVE MODE")
        jobs = []
        for i in range(n_exports):
            resp = client.post(
                "/api/exports", json=export_body("csv"), headers={**site.headers(), "Idempotency-Key": f"bounded-{i}"}
            )
            assert resp.status_code == 202, resp.text
            jobs.append(resp.json()["id"])
        tracked = bounded(app, "Ingress")["export tasks cancellable"]
        assert tracked["entries"] == EXPORT_BOUND
        assert tracked["evicted"] == n_exports - EXPORT_BOUND
        blocker.rollback()  # the lock goes; every export runs, the untracked ones too
        final = [wait_final(client, f"/api/exports/{job}", site.headers(), timeout_s=180)["status"] for job in jobs]
    assert final == ["completed"] * n_exports
    # The replica forgets each task once Ray reports it ended (a moment after the job's status says so).
    wait_until(
        lambda: bounded(app, "Ingress")["export tasks cancellable"]["entries"] == 0,
        what="the ingress to forget the ended export tasks",
        timeout_s=30,
        every_s=0.5,
    )
    # What outlives the request in Redis (job status, idempotency mapping) expires; the index of running jobs
    # (no TTL: its members are jobs, scored by lease deadline) no longer holds any of them.
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    mappings = [str(store.hget(job_key(j), "idempotency_key") or "") for j in jobs]
    assert all(m.startswith(IDEMPOTENCY_PREFIX) for m in mappings)
    ours = [*map(job_key, jobs), *mappings]
    ttls = [store.ttl(k) for k in ours]
    assert all(ttl > 0 for ttl in ttls), ttls
    assert not set(jobs) & set(store.zrange(ACTIVE_KEY, 0, -1))
