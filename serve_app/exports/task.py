"""The Ray edge of the runner: a remote task around ``run_export`` (no retries: a lost worker
ends its job as failed through the lease, never as a silent second run), and the export queue
the ingress hands to the routes (serve_app.api.deps.ExportQueue) that launches and cancels it and
records how each run ended.

The metrics of a run are recorded by the ingress replica that launched it, not by the task: Ray labels
every series with the recording worker's id and a node's agent keeps exporting the series of workers that
have exited, so metrics recorded in short-lived task workers grew by a set of series per worker (a 12-minute
soak: 406 task workers, +5,278 duration-bucket series). A replica's worker id lives as long as it does."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
import redis
from ray.util import metrics as ray_metrics
from redis.backoff import NoBackoff
from redis.retry import Retry

from serve_app.caching import BoundedCache
from serve_app.config import Settings
from serve_app.errors import ServiceUnavailable
from serve_app.exports import metrics, scripts
from serve_app.exports.notify import wait_for_deliveries
from serve_app.exports.runner import run_export, runner_settings

logger = logging.getLogger(__name__)


class RayMetrics:
    """The export metrics backend inside Ray processes (``ray.util.metrics``; Prometheus adds ``ray_``)."""

    def counter(self, name: str, *, description: str, tag_keys: tuple[str, ...]) -> metrics.Counter:
        return ray_metrics.Counter(name, description=description, tag_keys=tag_keys)

    def histogram(
        self, name: str, *, description: str, boundaries: Sequence[float], tag_keys: tuple[str, ...]
    ) -> metrics.Histogram:
        return ray_metrics.Histogram(name, description=description, boundaries=list(boundaries), tag_keys=tag_keys)


RAY_METRICS = RayMetrics()


TASK_NAME = "trailcam-export"
"""One name for every export task. Ray labels its ``ray_tasks`` series with the task name and the node's dashboard
agent holds each series it is sent: with a name per job, 300 exports made 2,001 ``ray_tasks`` series against 9 with
one name, and some outlive their task (benchmarks/repro_metric_series.py, Ray alone). The job id is in Redis and in
the logs."""


@ray.remote(max_retries=0)
def export_task(spec: dict[str, Any]) -> tuple[str, float]:
    """Run one export on a Ray worker; ``spec`` holds run_export's arguments. Returns the final status it set
    (or "gone") and how long the run took, seconds. The task ends once the job's notifications are delivered or
    given up (a bounded wait: Settings.notify_*), so the worker is not reclaimed while it still sends them."""
    started = time.monotonic()
    args = dict(spec)
    status = run_export(args.pop("dsn"), **args)
    duration_s = time.monotonic() - started
    wait_for_deliveries()
    return status, duration_s


def submit_export(dsn: str, *, job_id: str, num_cpus: float, **kw: Any) -> ray.ObjectRef[tuple[str, float]]:
    """Launch the task on ``num_cpus`` (Settings.export_task_num_cpus) without waiting; the ref serves cancellation."""
    spec = {"dsn": dsn, "job_id": job_id, **kw}
    return export_task.options(num_cpus=num_cpus, name=TASK_NAME).remote(spec)


class RayExportQueue:
    """One Ray task per export. ``refs`` only lets a delete cancel a task this process launched; nothing
    depends on it being complete (status lives in Redis): a task it no longer holds still ends when its job is
    deleted, at its next lease renewal. It holds tasks that have not ended (queued in Ray or running), at most
    Settings.export_tracked_max."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.refs: BoundedCache[str, ray.ObjectRef[tuple[str, float]]] = BoundedCache(
            name="export tasks cancellable", max_entries=settings.export_tracked_max
        )
        # For _lapse only; connects on first use. No retries: a job it cannot reach lapses with its lease anyway.
        self._redis = redis.Redis.from_url(
            settings.redis_dsn, socket_timeout=5, socket_connect_timeout=3, retry=Retry(NoBackoff(), 0)
        )

    async def submit(self, job_id: str, *, params: dict[str, Any]) -> None:
        """Launch the job's task (connecting to or starting Ray on first use)."""
        loop = asyncio.get_running_loop()
        try:
            # .remote() can block (it connects to or starts Ray on first use): off the event loop. The thread
            # also arranges the bookkeeping, so a request cancelled meanwhile still leaves its run counted.
            await asyncio.to_thread(self._launch, loop, job_id, params)
        except Exception as exc:
            logger.warning("cannot start export %s: %r", job_id, exc)
            raise ServiceUnavailable("ray", "cannot start the export task") from exc

    def _launch(self, loop: asyncio.AbstractEventLoop, job_id: str, params: dict[str, Any]) -> None:
        settings = self._settings
        ref = submit_export(
            settings.database_dsn,
            job_id=job_id,
            params=params,
            num_cpus=settings.export_task_num_cpus,
            **runner_settings(settings),
        )
        fmt = str(params.get("format"))
        # The map and the metrics are only touched on the event loop, in this order: tracked, then ended.
        loop.call_soon_threadsafe(self.refs.put, job_id, ref)

        def ended(done: concurrent.futures.Future[tuple[str, float]]) -> None:  # on Ray's callback thread
            with contextlib.suppress(RuntimeError):  # the loop closed (replica shutting down): nothing to record
                loop.call_soon_threadsafe(self._ended, job_id, fmt, done)

        ref.future().add_done_callback(ended)

    def _ended(self, job_id: str, fmt: str, done: concurrent.futures.Future[tuple[str, float]]) -> None:
        """Forget the task; count how its run ended. A task that raised is not counted here: its job is failed
        and counted by the sweeper (or a reader) as a lost worker's, at once (:meth:`_lapse`); a cancelled
        one's job was deleted (Ray reports it as TaskCancelledError: _lapse then finds no job)."""
        self.refs.pop(job_id)
        if done.cancelled():
            return
        if done.exception() is not None:
            asyncio.get_running_loop().run_in_executor(None, self._lapse, job_id, done.exception())
            return
        status, duration_s = done.result()
        if status in ("completed", "failed"):
            metrics.export_finished(status=status, fmt=fmt, duration_s=duration_s)

    def _lapse(self, job_id: str, error: BaseException | None) -> None:
        """End the lease of a job whose task ended without finishing it. A task that died before it claimed
        the job (its node lost, its worker unable to start) would otherwise leave it processing for the
        start grace (Settings.export_start_grace_s), and one that claimed it for the rest of its lease."""
        try:
            lapsed = self._redis.eval(scripts.LAPSE, 2, scripts.job_key(job_id), scripts.ACTIVE_KEY, job_id)
        except Exception as exc:  # noqa: BLE001 - the lease or the start grace still ends it, later
            logger.warning("export %s: its task ended (%r) and its lease could not be ended: %s", job_id, error, exc)
            return
        if lapsed:
            logger.warning("export %s: its task ended without finishing it (%r); failing it as lost", job_id, error)

    async def cancel(self, job_id: str) -> None:
        """Cancel the task when this process launched it and it still runs."""
        ref = self.refs.pop(job_id)
        if ref is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(ray.cancel, ref)
