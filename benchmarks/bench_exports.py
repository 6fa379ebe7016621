"""Export API through Serve vs the same FastAPI app on bare uvicorn: a rejected POST and a status GET."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as aioredis

from benchmarks.common import HttpCase, bench_settings, prepare_database, serve_vs_uvicorn, write_results
from serve_app.config import Settings
from serve_app.exports.files import file_uri
from serve_app.exports.jobs import JobStore, RunnerLease
from serve_app.keys import find_key
from serve_app.store.db import connect

# Fails VR-001 (equal dates) and VR-003 at once: rejected before anything is queued.
INVALID_BODY = json.dumps({"start_date": "2024-03-01", "end_date": "2024-03-01", "group_by": "year", "format": "csv"})
TARGETS = {
    ("POST invalid", "serve", 1): {"p99": "<= 5 ms"},
    ("GET status", "serve", 16): {"p99": "<= 20 ms"},
}


def completed_job(settings: dict[str, Any], key: str) -> str:
    """A completed export owned by the key, stored directly in the benchmark's Redis db."""
    with connect(str(settings["database_url"])) as conn:
        row = find_key(conn, key=key, pepper=Settings().key_pepper)
    assert row is not None
    owner = int(str(row["id"]))
    params = {"start_date": "2024-01-01", "end_date": "2024-02-01", "group_by": "week", "format": "csv"}

    async def create() -> str:
        client = aioredis.Redis.from_url(str(settings["redis_url"]), decode_responses=True)
        try:
            store = JobStore(client, status_ttl_s=3600, start_grace_s=3600)
            _, job = await store.create(
                owner=owner,
                params={**params, "site_ids": None},
                file_uri_for=lambda j: file_uri(str(settings["export_dir"]), j, "csv"),
            )
            assert job is not None
            return job.id
        finally:
            await client.aclose()

    job_id = asyncio.run(create())
    import redis

    sync = redis.Redis.from_url(str(settings["redis_url"]), decode_responses=True)
    RunnerLease(sync, job_id, lease_s=10).finish("completed", download_url=f"/api/exports/{job_id}/download")
    sync.close()
    return job_id


def main() -> None:
    """Both cases on both servers at 1 and 16 connections, then Serve/uvicorn ratios."""
    settings = bench_settings()
    key = prepare_database(settings)
    job_id = completed_job(settings, key)
    auth = {"Authorization": f"Bearer {key}"}
    cases = [
        HttpCase(
            "POST invalid", "/api/exports", "POST", INVALID_BODY, {**auth, "Content-Type": "application/json"}, True
        ),
        HttpCase("GET status", f"/api/exports/{job_id}", headers=auth),
    ]
    rows = serve_vs_uvicorn(
        settings,
        cases,
        targets=TARGETS,
        ratio_targets={("GET status", 16): ">= 0.5"},
    )
    write_results("exports", rows)


if __name__ == "__main__":
    main()
