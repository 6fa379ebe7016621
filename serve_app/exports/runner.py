"""The export runner: plain Python that the Ray task calls (tests call it directly too).

It claims its job (recording its PID), renews a lease from a heartbeat thread while it reads
Postgres and writes the file, then completes or fails the job in one compare-and-set. When
the job was deleted or expired meanwhile, it removes its own file and leaves no status. A job
it ended sends its notifications from a background thread, after the final status is written.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import psycopg
import redis

from serve_app.config import DEFAULT_SCIENTIFIC_NAME, Settings
from serve_app.errors import JobGone
from serve_app.exports.camtrap import CamtrapError, write_package
from serve_app.exports.files import ExportFiles, file_uri
from serve_app.exports.jobs import RunnerLease, download_path, utc_now_iso
from serve_app.exports.notify import Ended, NotifyConfig, deliver_in_background
from serve_app.exports.summary import write_summary
from serve_app.store.db import connect
from serve_app.store.exports import begin_snapshot

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300


def one_line(exc: BaseException) -> str:
    """A short, single-line reason for the API (no stack trace)."""
    if isinstance(exc, CamtrapError):
        text = str(exc)
    elif isinstance(exc, psycopg.Error):
        text = f"database error: {str(exc).strip() or type(exc).__name__}"
    else:
        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:MAX_ERROR_CHARS]


class Heartbeat(threading.Thread):
    """Renews the lease every third of its length; notices when the job is gone."""

    def __init__(self, lease: RunnerLease, *, interval_s: float) -> None:
        super().__init__(name="export-heartbeat", daemon=True)
        self._lease = lease
        self._interval_s = interval_s
        self._stop_event = threading.Event()
        self.gone = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval_s):
            try:
                if not self._lease.renew():
                    self.gone.set()
                    return
            except redis.RedisError as exc:  # the lease may lapse; the final CAS then tells
                logger.warning("lease renewal failed: %s", exc)

    def check(self) -> None:
        """Raise JobGone when the job no longer wants this runner (called between batches)."""
        if self.gone.is_set():
            raise JobGone()

    def stop(self) -> None:
        """End the thread (it exits within one interval at most; it is a daemon anyway)."""
        self._stop_event.set()


def _write(conn: psycopg.Connection[Any], sink: Any, *, job_id: str, params: dict[str, Any], **kw: Any) -> int:
    if params["format"] == "camtrap-dp":
        return write_package(conn, sink, job_id=job_id, params=params, **kw)
    kw.pop("scientific_name", None)
    return write_summary(conn, sink, params=params, **kw)


def runner_settings(settings: Settings) -> dict[str, Any]:
    """``run_export``'s arguments that come from the settings (all but the job and its params)."""
    return {
        "redis_url": settings.redis_dsn,
        "export_dir": settings.export_dir,
        "lease_s": settings.export_lease_s,
        "scientific_name": settings.export_scientific_name,
        "notify": NotifyConfig.from_settings(settings),
    }


def _announce(ended: Ended, notify: NotifyConfig | None, redis_url: str) -> None:
    """Start the job's notifications (if it asked for any); whatever happens, the job's outcome stands."""
    if not ended.targets:
        return
    if notify is None:
        logger.warning("export %s asked for notifications but this runner has no notification settings", ended.id)
        return
    try:
        deliver_in_background(ended, config=notify, redis_url=redis_url)
    except Exception as exc:  # noqa: BLE001 - e.g. no thread could be started: the status already stands
        logger.warning("export %s: cannot start its notifications: %s", ended.id, exc)


def run_export(
    dsn: str,
    *,
    job_id: str,
    params: dict[str, Any],
    redis_url: str,
    export_dir: str,
    lease_s: float,
    scientific_name: str = DEFAULT_SCIENTIFIC_NAME,
    notify: NotifyConfig | None = None,
) -> str:
    """Produce one export; returns the final status it set, or "gone" when the job vanished.

    The notifications of a job it ended go on in a background thread after it returns
    (:func:`serve_app.exports.notify.wait_for_deliveries` waits for them)."""
    fmt = str(params["format"])
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=3)
    try:
        lease = RunnerLease(client, job_id, lease_s=lease_s)
        if not lease.renew(worker_pid=os.getpid(), started_at=utc_now_iso(), progress=0.0):
            logger.info("export %s is no longer pending; not starting", job_id)
            return "gone"
        targets = lease.notify_targets()
        files = ExportFiles(export_dir)
        uri = file_uri(export_dir, job_id, fmt)
        heartbeat = Heartbeat(lease, interval_s=max(lease_s / 3, 0.05))
        heartbeat.start()
        try:
            with connect(dsn) as conn:
                begin_snapshot(conn)
                with files.open_part(uri) as sink:
                    rows = _write(
                        conn, sink, job_id=job_id, params=params, scientific_name=scientific_name, check=heartbeat.check
                    )
            heartbeat.check()
            files.publish(uri)
            size = files.size_bytes(uri)
        except BaseException as exc:
            heartbeat.stop()
            files.remove(uri)
            if isinstance(exc, JobGone):
                logger.info("export %s was deleted or expired while running; file removed", job_id)
                return "gone"
            if not isinstance(exc, Exception):
                raise  # cancellation (KeyboardInterrupt) or shutdown: the file is already gone
            logger.warning("export %s failed: %s", job_id, exc)
            error, finished_at = one_line(exc), utc_now_iso()
            if lease.finish("failed", error=error, finished_at=finished_at):
                failed = Ended(job_id, "failed", fmt, finished_at, params, targets, error=error)
                _announce(failed, notify, redis_url)
                return "failed"
            return "gone"
        heartbeat.stop()
        url, finished_at = download_path(job_id), utc_now_iso()
        if lease.finish(
            "completed", download_url=url, progress=1.0, rows=rows, size_bytes=size, finished_at=finished_at
        ):
            completed = Ended(job_id, "completed", fmt, finished_at, params, targets, download_url=url, rows=rows)
            _announce(completed, notify, redis_url)
            return "completed"
        # Deleted or expired between the last check and the final CAS: leave nothing behind.
        files.remove(uri)
        return "gone"
    finally:
        client.close()
