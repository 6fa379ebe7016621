"""Periodic cleanup: fail processing jobs whose lease lapsed, delete files older than the TTL.

Every replica runs the loop; a short Redis lock lets one of them sweep per interval. Missing
a sweep is harmless: readers fail lapsed jobs on their own, and the next sweep catches up.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from serve_app.exports import metrics, scripts
from serve_app.exports.files import ExportFiles
from serve_app.exports.jobs import Job, JobStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did."""

    jobs_failed: int
    files_removed: int


async def job_lost(job: Job, files: ExportFiles) -> None:
    """Bookkeeping after a lapsed lease failed a job: count it, drop a half-written file."""
    metrics.export_finished(status="failed", fmt=job.fields.get("format", "unknown"))
    await asyncio.to_thread(files.remove, job.file_uri)


async def sweep_once(store: JobStore, files: ExportFiles, *, file_ttl_s: float) -> SweepResult:
    """One pass over the lapsed-lease index and the export store."""
    failed = 0
    for job_id in await store.lapsed_candidates():
        job, lapsed = await store.read(job_id)
        if job is not None and lapsed:
            failed += 1
            logger.warning("export %s failed: worker lost (lease lapsed)", job_id)
            await job_lost(job, files)
    removed = await asyncio.to_thread(files.sweep, older_than_s=file_ttl_s)
    if failed or removed:
        logger.info("export sweep: %d lapsed job(s) failed, %d old file(s) removed", failed, removed)
    return SweepResult(failed, removed)


async def run_sweeper(
    client: aioredis.Redis, store: JobStore, files: ExportFiles, *, interval_s: float, file_ttl_s: float
) -> None:
    """Sweep forever (cancelled at shutdown); errors are logged and retried next interval."""
    while True:
        try:
            if await client.set(scripts.SWEEP_LOCK_KEY, "1", nx=True, px=max(int(interval_s * 900), 1)):
                await sweep_once(store, files, file_ttl_s=file_ttl_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis or storage hiccups must not end the loop
            logger.warning("export sweep failed: %s", exc)
        await asyncio.sleep(interval_s)
