"""Helpers several test directories share: auth headers, noise JPEGs, export bodies and polling, score counts,
an export queue that runs without Ray."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import psycopg
from PIL import Image

from serve_app.config import Settings
from serve_app.exports.runner import run_export, runner_settings
from tests.waiting import wait_until


def auth(key: str) -> dict[str, str]:
    """The Authorization header for a key."""
    return {"Authorization": f"Bearer {key}"}


def write_jpeg(root: Path, rel: str, *, seed: int, size: tuple[int, int] = (320, 240)) -> str:
    """A noise JPEG under the image root; returns its relative URI."""
    rng = np.random.default_rng(seed)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return rel


def export_body(fmt: str = "csv", *, days: int = 30, group_by: str = "week", **extra: Any) -> dict[str, Any]:
    """A valid export request body for the ``days`` ending today."""
    today = dt.datetime.now(dt.UTC).date()
    return {
        "start_date": (today - dt.timedelta(days=days)).isoformat(),
        "end_date": today.isoformat(),
        "group_by": group_by,
        "format": fmt,
        **extra,
    }


def wait_final(
    client: httpx.Client, url: str, headers: dict[str, str], *, timeout_s: float = 60, unavailable_ok: bool = False
) -> dict[str, Any]:
    """Poll an export job until it leaves processing and return its final body.

    Every poll must answer 200; with ``unavailable_ok`` a 503 (a service is down on purpose) is polled again.
    """

    def final() -> dict[str, Any] | None:
        resp = client.get(url, headers=headers)
        if unavailable_ok and resp.status_code == 503:
            return None
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body if body["status"] != "processing" else None

    result: dict[str, Any] = wait_until(final, what=f"{url} to leave processing", timeout_s=timeout_s, every_s=0.1)
    return result


def score_duplicates(conn: psycopg.Connection[Any], *, source: str | None = None) -> int:
    """(detection, deer, model) triples logged more than once, by ``source`` or across all sources."""
    row = conn.execute(
        "SELECT count(*) AS n FROM (SELECT 1 FROM reid_similarity_scores WHERE %(source)s::text IS NULL"
        " OR source = %(source)s GROUP BY detection_id, deer_id, model_version HAVING count(*) > 1) d",
        {"source": source},
    ).fetchone()
    assert row is not None
    return int(row["n"])


class ThreadQueue:
    """The export queue of an app built without Ray: runs each export with the real runner in a worker thread
    (what the Ray task does) and keeps those runs (``runs``) and the jobs it was asked to cancel (``cancelled``).
    ``start=False`` never starts a run, like a cluster that never schedules the task; ``start="refuse"`` cannot
    start one at all."""

    def __init__(self, settings: Settings, *, start: bool | Literal["refuse"] = True) -> None:
        self.settings = settings
        self.start = start
        self.runs: list[asyncio.Task[str]] = []
        self.cancelled: list[str] = []

    async def submit(self, job_id: str, *, params: dict[str, Any]) -> None:
        if self.start == "refuse":
            raise RuntimeError("no worker can take the task")
        if self.start:
            s = self.settings
            run = asyncio.to_thread(run_export, s.database_dsn, job_id=job_id, params=params, **runner_settings(s))
            self.runs.append(asyncio.create_task(run))

    async def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
