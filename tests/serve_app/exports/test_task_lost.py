"""An export whose Ray task ends without finishing it (here: it raises before it claims the job, as a task whose
node died or whose worker could not start) is failed as a lost worker's at once, not after the start grace."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from serve_app.config import Settings
from serve_app.exports.jobs import JobStore
from serve_app.exports.scripts import ACTIVE_KEY, LAPSE, WORKER_LOST, job_key
from serve_app.exports.task import RayExportQueue
from tests.fixtures.ray_cluster import app_settings
from tests.waiting import wait_until_async

START_GRACE_S = 300.0


@pytest.mark.usefixtures("ray_session")
def test_a_task_that_ends_before_claiming_its_job_fails_the_job_at_once(
    database_url: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = Settings(**app_settings(database_url, redis_url, tmp_path), export_start_grace_s=START_GRACE_S)

    async def scenario() -> tuple[str, dict[str, str], float]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = JobStore(client, status_ttl_s=600, start_grace_s=START_GRACE_S)
        outcome, job = await store.create(owner=1, params={"format": "csv"}, file_uri_for=lambda i: f"{i}.csv")
        assert outcome == "created" and job is not None
        queue = RayExportQueue(settings)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await queue.submit(job.id, params={})  # no format: run_export raises before it claims the job

        async def ended() -> dict[str, str] | None:
            found, _ = await store.read(job.id)
            return found.fields if found is not None and found.fields["status"] != "processing" else None

        fields = await wait_until_async(ended, what="the job failed", timeout_s=60)
        await client.aclose()
        return job.id, fields, loop.time() - started

    job_id, fields, took_s = asyncio.run(scenario())
    assert fields["status"] == "failed" and fields["error"] == WORKER_LOST, fields
    assert took_s < START_GRACE_S / 5
    assert redis_client.zscore(ACTIVE_KEY, job_id) is None


def test_ending_a_lease_early_leaves_a_finished_or_missing_job_alone(redis_url: str, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = JobStore(client, status_ttl_s=600, start_grace_s=START_GRACE_S)
        _, ended = await store.create(owner=1, params={"format": "csv"}, file_uri_for=lambda i: f"{i}.csv")
        _, running = await store.create(owner=1, params={"format": "csv"}, file_uri_for=lambda i: f"{i}.csv")
        assert ended is not None and running is not None
        assert await store.fail(ended.id, error="export failed: disk full")
        for job_id, expected in ((ended.id, 0), ("no-such-job", 0), (running.id, 1)):
            assert redis_client.eval(LAPSE, 2, job_key(job_id), ACTIVE_KEY, job_id) == expected, job_id
        after_end, _ = await store.read(ended.id)
        assert after_end is not None and after_end.fields["error"] == "export failed: disk full"
        assert not redis_client.exists(job_key("no-such-job"))
        after_lapse, lapsed = await store.read(running.id)
        assert lapsed and after_lapse is not None and after_lapse.fields["error"] == WORKER_LOST
        await client.aclose()

    asyncio.run(scenario())
