"""The Redis job store: compare-and-set transitions, TTL kept by updates, lapsed leases fail."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from serve_app.exports import scripts
from serve_app.exports.files import ExportFiles
from serve_app.exports.jobs import JobStore, RunnerLease
from serve_app.exports.sweeper import run_sweeper

PARAMS = {"start_date": "2024-01-01", "end_date": "2024-02-01", "group_by": "day", "format": "csv", "site_ids": None}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _create(redis_url: str, *, ttl_s: int = 60, grace_s: float = 30, **kw: Any) -> Any:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store = JobStore(client, status_ttl_s=ttl_s, start_grace_s=grace_s)
        return await store.create(owner=7, params=PARAMS, file_uri_for=lambda j: f"/tmp/{j}.csv", **kw)
    finally:
        await client.aclose()


async def _read(redis_url: str, job_id: str) -> Any:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return await JobStore(client, status_ttl_s=60, start_grace_s=30).read(job_id)
    finally:
        await client.aclose()


def test_updates_neither_extend_nor_drop_the_ttl(redis_url: str, redis_client: redis.Redis) -> None:
    _, job = run(_create(redis_url, ttl_s=30))
    key = scripts.job_key(job.id)
    first = redis_client.pttl(key)
    assert 0 < first <= 30_000
    lease = RunnerLease(redis_client, job.id, lease_s=5)
    time.sleep(0.2)
    assert lease.renew(progress=0.5, worker_pid=1)
    after_renew = redis_client.pttl(key)
    assert 0 < after_renew < first
    assert lease.finish("completed", download_url="/x")
    after_finish = redis_client.pttl(key)
    assert 0 < after_finish <= after_renew
    assert redis_client.ttl(key) > 0


def test_each_transition_happens_once(redis_url: str, redis_client: redis.Redis) -> None:
    _, job = run(_create(redis_url))
    lease = RunnerLease(redis_client, job.id, lease_s=5)
    assert lease.finish("completed", download_url="/x")
    assert not lease.finish("failed", error="late")
    assert not lease.renew(progress=0.1)
    assert redis_client.hget(scripts.job_key(job.id), "status") == "completed"
    assert redis_client.zscore(scripts.ACTIVE_KEY, job.id) is None


def test_no_update_recreates_an_expired_job(redis_url: str, redis_client: redis.Redis) -> None:
    _, job = run(_create(redis_url))
    redis_client.delete(scripts.job_key(job.id))
    lease = RunnerLease(redis_client, job.id, lease_s=5)
    assert not lease.renew(progress=0.5)
    assert not lease.finish("completed", download_url="/x")
    assert redis_client.exists(scripts.job_key(job.id)) == 0


def test_a_lapsed_lease_reads_as_failed_worker_lost(redis_url: str, redis_client: redis.Redis) -> None:
    _, job = run(_create(redis_url, grace_s=0.2))
    fresh, lapsed = run(_read(redis_url, job.id))
    assert fresh.status == "processing" and not lapsed
    time.sleep(0.3)
    failed, lapsed = run(_read(redis_url, job.id))
    assert lapsed and failed.status == "failed" and failed.fields["error"] == "export worker lost"
    again, lapsed_again = run(_read(redis_url, job.id))
    assert again.status == "failed" and not lapsed_again  # counted once


def test_idempotency_key_returns_the_same_job_or_conflicts(redis_url: str) -> None:
    outcome, job = run(_create(redis_url, idempotency=("k1", "body-a")))
    assert outcome == "created"
    again, same = run(_create(redis_url, idempotency=("k1", "body-a")))
    assert again == "existing" and same.id == job.id
    conflict, none = run(_create(redis_url, idempotency=("k1", "body-b")))
    assert conflict == "conflict" and none is None
    other, different = run(_create(redis_url, idempotency=("k2", "body-a")))
    assert other == "created" and different.id != job.id


def test_a_slow_sweeper_does_not_hold_back_a_fast_one(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Sweepers with different intervals share one Redis (a roll-out, a second app): the lock lasts a sweep only."""

    async def scenario() -> tuple[float, str | None]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = JobStore(client, status_ttl_s=60, start_grace_s=0.3)
        files = ExportFiles(str(tmp_path))
        slow = asyncio.create_task(run_sweeper(client, store, files, interval_s=30, file_ttl_s=60))
        await asyncio.sleep(0.2)  # the slow sweeper has swept once and sleeps for 30 s
        _, job = await store.create(owner=7, params=PARAMS, file_uri_for=lambda j: str(tmp_path / f"{j}.csv"))
        fast = asyncio.create_task(run_sweeper(client, store, files, interval_s=0.1, file_ttl_s=60))
        started = time.monotonic()
        for _ in range(250):  # up to 5 s
            if redis_client.hget(scripts.job_key(job.id), "status") != "processing":
                break
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        for task in (slow, fast):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.aclose()
        return elapsed, redis_client.hget(scripts.job_key(job.id), "error")

    elapsed, error = run(scenario())
    assert error == "export worker lost"  # the sweeper failed it: nothing read it through the API
    assert elapsed < 0.3 + 1.0, f"lapsed job failed only after {elapsed:.2f}s"


def test_a_cancelled_sweeper_always_stops(redis_url: str, tmp_path: Path) -> None:
    """Shutdown cancels the sweeper and waits for it: a cancel landing anywhere in a sweep must end the loop."""

    async def scenario() -> int:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = JobStore(client, status_ttl_s=60, start_grace_s=0.01)
        files = ExportFiles(str(tmp_path))
        stuck = 0
        for i in range(120):
            await store.create(owner=7, params=PARAMS, file_uri_for=lambda j: str(tmp_path / f"{j}.csv"))
            task = asyncio.create_task(run_sweeper(client, store, files, interval_s=0.005, file_ttl_s=60))
            await asyncio.sleep(0.001 * (i % 25))  # cancel at varying points of a sweep
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=3)
            if not done:
                stuck += 1
                break
        await client.aclose()
        return stuck

    assert run(scenario()) == 0, "a cancelled sweeper kept running"
