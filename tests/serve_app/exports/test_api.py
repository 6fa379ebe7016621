"""The export API over real HTTP on Serve: lifecycle per format, rejections, keys, idempotency."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pyarrow.parquet as pq
import pytest
import redis

from serve_app.exports import scripts
from tests import factories
from tests.helpers import auth, export_body, wait_final
from tests.serve_app.exports.conftest import TODAY, Dataset, sql_detections
from tests.waiting import sessions_waiting_on_locks, wait_until

TOMORROW = TODAY + dt.timedelta(days=1)


def job_keys(client: redis.Redis) -> list[str]:
    return [str(k) for k in client.scan_iter(scripts.JOB_PREFIX + "*")]


def detections_in(fmt: str, content: bytes) -> int:
    if fmt == "csv":
        return sum(int(r["detections"]) for r in csv.DictReader(io.StringIO(content.decode())))
    if fmt == "json":
        return sum(r["detections"] for r in json.loads(content))
    if fmt == "parquet":
        return int(sum(pq.read_table(io.BytesIO(content)).column("detections").to_pylist()))
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        return len(zf.read("observations.csv").decode().strip().splitlines()) - 1


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        ("csv", "text/csv"),
        ("parquet", "application/vnd.apache.parquet"),
        ("json", "application/json"),
        ("camtrap-dp", "application/zip"),
    ],
)
def test_post_poll_download_delete_for_every_format(
    serve_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis, dataset: Dataset, fmt: str, media_type: str
) -> None:
    key = factories.api_key(db)
    headers = auth(key)
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        resp = client.post("/api/exports", json=export_body(fmt, site_ids=[dataset.sites[1]]), headers=headers)
        assert resp.status_code == 202, resp.text
        created = resp.json()
        assert created["status"] == "processing"
        assert resp.headers["location"] == f"/api/exports/{created['id']}"
        assert resp.headers["retry-after"] == "1"
        file_uri = redis_client.hget(scripts.job_key(created["id"]), "file_uri")
        final = wait_final(client, resp.headers["location"], headers)
        assert final["status"] == "completed", final
        assert final["download_url"] == f"/api/exports/{created['id']}/download"
        assert final["params"]["site_ids"] == [dataset.sites[1]]
        download = client.get(final["download_url"], headers=headers)
        assert download.status_code == 200
        assert download.headers["content-type"].startswith(media_type)
        assert f"-{created['id'][:8]}." in download.headers["content-disposition"]
        expected = sql_detections(db, start=TODAY - dt.timedelta(days=30), end=TODAY, sites=[dataset.sites[1]])
        assert detections_in(fmt, download.content) == expected > 0
        assert client.delete(resp.headers["location"], headers=headers).status_code == 204
        gone = client.get(resp.headers["location"], headers=headers)
        assert gone.status_code == 404
        assert gone.headers["content-type"].startswith("application/problem+json")
        assert client.get(final["download_url"], headers=headers).status_code == 404
        assert client.delete(resp.headers["location"], headers=headers).status_code == 404
    assert file_uri and not Path(file_uri).exists()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (export_body(start_date=TODAY.isoformat(), end_date=TODAY.isoformat()), {("VR-001", "end_date")}),
        (
            export_body(start_date=(TODAY - dt.timedelta(days=366)).isoformat()),
            {("VR-002", "end_date")},
        ),
        (export_body(group_by="fortnight"), {("VR-003", "group_by")}),
        (
            export_body(start_date=TOMORROW.isoformat(), end_date=(TOMORROW + dt.timedelta(days=1)).isoformat()),
            {("VR-004", "start_date"), ("VR-005", "end_date")},
        ),
        (export_body(end_date=TOMORROW.isoformat()), {("VR-005", "end_date")}),
        (
            {"start_date": "2024-02-30", "end_date": TODAY.isoformat(), "group_by": "year", "colour": "red"},
            {
                ("format", "start_date"),
                ("VR-003", "group_by"),
                ("unknown_field", "colour"),
                ("missing_field", "format"),
            },
        ),
        (export_body(site_ids=[987654]), {("site_access", "site_ids")}),
    ],
)
def test_invalid_requests_are_rejected_with_every_rule_and_no_job(
    serve_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis, body: dict[str, Any], expected: set[Any]
) -> None:
    key = factories.api_key(db)
    resp = httpx.post(serve_url + "/api/exports", json=body, headers=auth(key), timeout=30)
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert {problem[k] is not None for k in ("type", "title", "status", "detail")} == {True}
    assert problem["status"] == 400
    assert {(e["rule"], e["field"]) for e in problem["errors"]} == expected
    assert all(e["detail"] for e in problem["errors"])
    assert job_keys(redis_client) == []
    assert redis_client.zcard(scripts.ACTIVE_KEY) == 0


def test_within_the_boundaries_is_accepted(
    serve_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    key = factories.api_key(db)
    body = export_body(start_date=(TODAY - dt.timedelta(days=365)).isoformat(), group_by="month")
    resp = httpx.post(serve_url + "/api/exports", json=body, headers=auth(key), timeout=30)
    assert resp.status_code == 202, resp.text
    malformed = httpx.post(serve_url + "/api/exports", content=b"{not json", headers=auth(key), timeout=30)
    assert malformed.status_code == 400
    assert malformed.json()["errors"][0]["rule"] == "malformed_json"


def test_keys_see_only_their_own_jobs_and_sites(
    serve_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis, dataset: Dataset
) -> None:
    owner = auth(factories.api_key(db, sites=[dataset.sites[0]]))
    other = auth(factories.api_key(db))
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        assert client.post("/api/exports", json=export_body()).status_code == 401
        assert client.post("/api/exports", json=export_body(), headers=auth("tcr_nope")).status_code == 401
        denied = client.post("/api/exports", json=export_body(site_ids=[dataset.sites[1]]), headers=owner)
        assert denied.status_code == 400 and denied.json()["errors"][0]["rule"] == "site_access"
        resp = client.post("/api/exports", json=export_body("csv"), headers=owner)
        url = resp.headers["location"]
        final = wait_final(client, url, owner)
        assert final["params"]["site_ids"] == [dataset.sites[0]]
        for call in (client.get(url), client.get(final["download_url"]), client.delete(url)):
            assert call.status_code == 401
            assert call.headers["www-authenticate"] == "Bearer"
        assert client.get(url, headers=other).status_code == 404
        assert client.get(final["download_url"], headers=other).status_code == 404
        assert client.delete(url, headers=other).status_code == 404
        download = client.get(final["download_url"], headers=owner)
        assert download.status_code == 200
        rows = list(csv.DictReader(io.StringIO(download.text)))
        assert rows and {int(r["site_id"]) for r in rows} == {dataset.sites[0]}


def test_idempotency_key_replays_the_job_or_answers_422(
    serve_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis, dataset: Dataset
) -> None:
    key = auth(factories.api_key(db))
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        first = client.post("/api/exports", json=export_body(), headers={**key, "Idempotency-Key": "abc"})
        again = client.post("/api/exports", json=export_body(), headers={**key, "Idempotency-Key": "abc"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        assert len(job_keys(redis_client)) == 1
        clash = client.post("/api/exports", json=export_body("json"), headers={**key, "Idempotency-Key": "abc"})
        assert clash.status_code == 422
        assert clash.headers["content-type"].startswith("application/problem+json")
        assert len(job_keys(redis_client)) == 1


def test_delete_cancels_a_running_job_and_leaves_no_file(
    serve_url: str, database_url: str, db: psycopg.Connection[Any], redis_client: redis.Redis, dataset: Dataset
) -> None:
    key = auth(factories.api_key(db))
    with psycopg.connect(database_url) as blocker, httpx.Client(base_url=serve_url, timeout=30) as client:
        blocker.execute("LOCK TABLE detections IN ACCESS EXCLUSIVE MODE")  # holds the runner mid-query
        resp = client.post("/api/exports", json=export_body("camtrap-dp"), headers=key)
        url = resp.headers["location"]
        job_key = scripts.job_key(resp.json()["id"])
        file_uri = redis_client.hget(job_key, "file_uri")
        deadline = time.monotonic() + 30
        while not redis_client.hget(job_key, "worker_pid") and time.monotonic() < deadline:
            time.sleep(0.05)
        wait_until(lambda: sessions_waiting_on_locks(db) >= 1, what="the export runner waiting on the lock")
        running = client.get(url, headers=key)
        assert running.json()["status"] == "processing"
        assert running.headers["retry-after"] == "1"
        assert client.delete(url, headers=key).status_code == 204
        assert client.get(url, headers=key).status_code == 404
        blocker.rollback()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (Path(file_uri).exists() or Path(file_uri + ".part").exists()):
        time.sleep(0.1)
    assert not Path(file_uri).exists() and not Path(file_uri + ".part").exists()
    assert redis_client.exists(job_key) == 0


def test_openapi_documents_the_export_body(serve_url: str) -> None:
    spec = httpx.get(serve_url + "/openapi.json", timeout=30).json()
    post = spec["paths"]["/api/exports"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"start_date", "end_date", "group_by", "format", "site_ids", "notify"}
    assert {"400", "401", "422", "202"} <= set(post["responses"])
