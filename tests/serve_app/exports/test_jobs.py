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
    assert 0 < redis_client.pttl(key) <= 30_000
    expires_at_ms = redis_client.pexpiretime(key)  # absolute: unchanged means neither extended nor dropped
    lease = RunnerLease(redis_client, job.id, lease_s=5)
    assert lease.renew(progress=0.5, worker_pid=1)
    assert redis_client.pexpiretime(key) == expires_at_ms
    assert lease.finish("completed", download_url="/x")
    assert redis_client.pexpiretime(key) == expires_at_ms
    assert redis_client.hget(key, "status") == "completed"


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
    # The first read must come before the grace ends; on a loaded 2-core machine 0.2 s was not always enough.
    _, job = run(_create(redis_url, grace_s=2.0))
    fresh, lapsed = run(_read(redis_url, job.id))
    assert fresh.status == "processing" and not lapsed
    deadline = time.monotonic() + 30
    while (current := run(_read(redis_url, job.id)))[0].status == "processing":
        assert time.monotonic() < deadline, "the lapsed lease never failed the job"
        time.sleep(0.05)
    failed, lapsed = current
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


class _RetryBeforeMappingDelete(aioredis.Redis):
    """A real client that, the first time it deletes an idempotency mapping, lets a client retry run first.

    This is the interleaving a two-step delete allows (job removed, then mapping removed); a delete
    that is one script never sends that DEL, so the retry then runs after it.
    """

    retry: Any = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if args[0] == "DEL" and self.retry is not None and str(args[1]).startswith(scripts.IDEMPOTENCY_PREFIX):
            retry, self.retry = self.retry, None
            await retry()
        return await super().execute_command(*args, **options)


def test_delete_and_a_retry_with_its_idempotency_key_leave_exactly_one_new_job(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """DELETE then a retry of the original POST: the retry makes one new job, and every later retry finds it."""

    async def scenario() -> tuple[str, list[str]]:
        client = _RetryBeforeMappingDelete.from_url(redis_url, decode_responses=True)
        store = JobStore(client, status_ttl_s=60, start_grace_s=30)
        retried: list[str] = []

        async def retry() -> None:
            outcome, job = await store.create(
                owner=7, params=PARAMS, file_uri_for=lambda j: f"/tmp/{j}.csv", idempotency=("k1", "body-a")
            )
            assert outcome in ("created", "existing")
            retried.append(job.id)

        try:
            _, first = await store.create(
                owner=7, params=PARAMS, file_uri_for=lambda j: f"/tmp/{j}.csv", idempotency=("k1", "body-a")
            )
            client.retry = retry
            assert await store.delete(first.id, owner=7) is not None
            if client.retry is not None:  # the delete sent no separate DEL: the retry comes after it
                client.retry = None
                await retry()
            for _ in range(2):
                await retry()
            return first.id, retried
        finally:
            await client.aclose()

    deleted, retried = run(scenario())
    assert deleted not in retried
    assert len(set(retried)) == 1, f"retries after the delete made {len(set(retried))} jobs: {retried}"
    assert [str(k) for k in redis_client.scan_iter(scripts.JOB_PREFIX + "*")] == [scripts.job_key(retried[0])]


def test_delete_keeps_a_mapping_that_names_another_job(redis_url: str, redis_client: redis.Redis) -> None:
    """A mapping already pointing at a newer job survives the delete of the old job."""
    _, old = run(_create(redis_url, idempotency=("k1", "body-a")))
    mapping = scripts.idempotency_key(7, "k1")
    redis_client.hset(mapping, "job_id", "newer")

    async def delete() -> Any:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            return await JobStore(client, status_ttl_s=60, start_grace_s=30).delete(old.id, owner=7)
        finally:
            await client.aclose()

    assert run(delete()) is not None
    assert redis_client.hget(mapping, "job_id") == "newer"


async def _until(condition: Any, *, what: str, timeout_s: float = 30) -> None:
    """Poll an async condition until it holds; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def test_a_slow_sweeper_does_not_hold_back_a_fast_one(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Sweepers with different intervals share one Redis (a roll-out, a second app): the lock lasts a sweep only."""

    def failed(job_id: str) -> Any:
        async def check() -> bool:
            return bool(redis_client.hget(scripts.job_key(job_id), "status") == "failed")

        return check

    async def scenario() -> str | None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = JobStore(client, status_ttl_s=60, start_grace_s=0.05)
        files = ExportFiles(str(tmp_path))
        _, first = await store.create(owner=7, params=PARAMS, file_uri_for=lambda j: str(tmp_path / f"{j}.csv"))

        async def first_lapsed() -> bool:
            seconds, micros = await client.time()
            lease = redis_client.hget(scripts.job_key(first.id), "lease_until_ms")
            return int(lease or 0) < int(seconds) * 1000 + int(micros) // 1000

        await _until(first_lapsed, what="the first job's lease lapsed")
        slow = asyncio.create_task(run_sweeper(client, store, files, interval_s=3600, file_ttl_s=60))
        # The slow sweeper's one sweep fails the first job; then it sleeps for an hour.
        await _until(failed(first.id), what="the slow sweeper swept once")
        _, job = await store.create(owner=7, params=PARAMS, file_uri_for=lambda j: str(tmp_path / f"{j}.csv"))
        fast = asyncio.create_task(run_sweeper(client, store, files, interval_s=0.1, file_ttl_s=60))
        try:
            # Nothing reads the job: only the fast sweeper can fail it before the hour is up.
            await _until(failed(job.id), what="the fast sweeper failed the lapsed job")
        finally:
            for task in (slow, fast):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await client.aclose()
        return redis_client.hget(scripts.job_key(job.id), "error")

    assert run(scenario()) == "export worker lost"


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
