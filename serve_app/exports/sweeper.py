"""Periodic cleanup: fail processing jobs whose lease lapsed, delete files older than the TTL.

A job this process fails has its notifications sent from here (the ingress's event loop), as for every
other final transition: by the process that made it.

Every replica runs the loop; a Redis lock, held only while a sweep runs, keeps two sweeps from
overlapping. Holding it no longer than that matters: replicas (or applications) with different
intervals share one Redis, and a lock left for a long interval would starve a short one. Missing a
sweep is harmless: readers fail lapsed jobs on their own, and the next sweep catches up.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from serve_app.exports import metrics, scripts
from serve_app.exports.files import ExportFiles
from serve_app.exports.jobs import Job, JobStore
from serve_app.exports.notify import Notifier

logger = logging.getLogger(__name__)

LOCK_SAFETY_MS = 30_000  # frees the lock of a replica that died mid-sweep


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did."""

    jobs_failed: int
    files_removed: int


async def job_lost(job: Job, files: ExportFiles, notifier: Notifier | None = None) -> None:
    """Bookkeeping after a lapsed lease failed a job: count it, start its notifications, drop a half-written file."""
    metrics.export_finished(status="failed", fmt=job.fields.get("format", "unknown"))
    if notifier is not None:
        notifier.job_ended(job)
    await asyncio.to_thread(files.remove, job.file_uri)


async def sweep_once(
    store: JobStore, files: ExportFiles, *, file_ttl_s: float, notifier: Notifier | None = None
) -> SweepResult:
    """One pass over the lapsed-lease index and the export store."""
    failed = 0
    for job_id in await store.lapsed_candidates():
        job, lapsed = await store.read(job_id)
        if job is not None and lapsed:
            failed += 1
            logger.warning("export %s failed: worker lost (lease lapsed)", job_id)
            await job_lost(job, files, notifier)
    removed = await asyncio.to_thread(files.sweep, older_than_s=file_ttl_s)
    if failed or removed:
        logger.info("export sweep: %d lapsed job(s) failed, %d old file(s) removed", failed, removed)
    return SweepResult(failed, removed)


async def run_sweeper(
    client: aioredis.Redis,
    store: JobStore,
    files: ExportFiles,
    *,
    interval_s: float,
    file_ttl_s: float,
    notifier: Notifier | None = None,
) -> None:
    """Sweep forever (cancelled at shutdown); errors are logged and retried next interval."""
    release = client.register_script(scripts.RELEASE_LOCK)
    while True:
        try:
            token = uuid.uuid4().hex
            if await client.set(scripts.SWEEP_LOCK_KEY, token, nx=True, px=LOCK_SAFETY_MS):
                try:
                    await sweep_once(store, files, file_ttl_s=file_ttl_s, notifier=notifier)
                finally:
                    await release(keys=[scripts.SWEEP_LOCK_KEY], args=[token])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis or storage hiccups must not end the loop
            logger.warning("export sweep failed: %s", exc)
        if _cancel_requested():
            raise asyncio.CancelledError
        await asyncio.sleep(interval_s)


def _cancel_requested() -> bool:
    """Whether this task was asked to stop. A cancellation that lands inside a Redis call can be
    swallowed there (the task stays "cancelling" and the call returns); the loop must end anyway."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
