"""The runner as plain Python against real Postgres and Redis: files, counts, Camtrap DP checks."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
import redis
import redis.asyncio as aioredis
from frictionless import Package
from jsonschema import Draft4Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from serve_app.exports import scripts
from serve_app.exports.files import file_uri
from serve_app.exports.jobs import JobStore, RunnerLease
from serve_app.exports.runner import Heartbeat, run_export
from tests import factories
from tests.fixtures.camtrap_official import OFFICIAL, needs_official
from tests.serve_app.exports.conftest import TODAY, Dataset, sql_detections


def new_job(redis_url: str, export_dir: Path, params: dict[str, Any]) -> str:
    async def create() -> str:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            store = JobStore(client, status_ttl_s=60, start_grace_s=30)
            _, job = await store.create(
                owner=1, params=params, file_uri_for=lambda j: file_uri(str(export_dir), j, params["format"])
            )
            assert job is not None
            return job.id
        finally:
            await client.aclose()

    return asyncio.run(create())


def params(fmt: str, *, days: int = 30, group_by: str = "week", sites: list[int] | None = None) -> dict[str, Any]:
    start = TODAY - dt.timedelta(days=days)
    return {
        "start_date": start.isoformat(),
        "end_date": TODAY.isoformat(),
        "group_by": group_by,
        "format": fmt,
        "site_ids": sites,
    }


def export(database_url: str, redis_url: str, tmp_path: Path, p: dict[str, Any]) -> tuple[str, dict[str, str]]:
    job_id = new_job(redis_url, tmp_path, p)
    status = run_export(database_url, job_id=job_id, params=p, redis_url=redis_url, export_dir=str(tmp_path), lease_s=2)
    fields = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(scripts.job_key(job_id))
    return status, fields


@pytest.mark.parametrize("group_by", ["day", "week", "month"])
def test_summary_counts_add_up_to_sql(
    database_url: str,
    redis_client: redis.Redis,
    redis_url: str,
    dataset: Dataset,
    db: Any,
    tmp_path: Path,
    group_by: str,
) -> None:
    p = params("csv", group_by=group_by, sites=[dataset.sites[0]])
    status, fields = export(database_url, redis_url, tmp_path, p)
    assert status == "completed" and fields["status"] == "completed"
    rows = list(csv.DictReader(io.StringIO(Path(fields["file_uri"]).read_text())))
    assert sum(int(r["detections"]) for r in rows) == sql_detections(
        db, start=TODAY - dt.timedelta(days=30), end=TODAY, sites=[dataset.sites[0]]
    )
    assert {int(r["site_id"]) for r in rows} == {dataset.sites[0]}
    starts = {dt.date.fromisoformat(r["period_start"]) for r in rows}
    if group_by == "week":
        assert {d.isoweekday() for d in starts} == {1}
    if group_by == "month":
        assert {d.day for d in starts} == {1}
    assert any(r["deer_id"] == "" for r in rows)  # unidentified detections are a row with no deer


def test_parquet_and_json_hold_the_same_rows_as_csv(
    database_url: str, redis_client: redis.Redis, redis_url: str, dataset: Dataset, tmp_path: Path
) -> None:
    _, as_csv = export(database_url, redis_url, tmp_path, params("csv"))
    _, as_parquet = export(database_url, redis_url, tmp_path, params("parquet"))
    _, as_json = export(database_url, redis_url, tmp_path, params("json"))
    csv_rows = list(csv.DictReader(io.StringIO(Path(as_csv["file_uri"]).read_text())))
    table = pq.read_table(as_parquet["file_uri"])
    json_rows = json.loads(Path(as_json["file_uri"]).read_text())
    assert table.column_names == list(csv_rows[0].keys())
    assert table.num_rows == len(csv_rows) == len(json_rows)
    assert sum(table.column("detections").to_pylist()) == sum(r["detections"] for r in json_rows)
    assert str(table.schema.field("first_seen").type) == "timestamp[us, tz=UTC]"


def _profile_validator() -> Draft4Validator:
    """The Camtrap DP 1.0.2 profile. Its two remote references resolve to permissive local stubs
    (empty schemas): the Frictionless data-package schema
    (https://specs.frictionlessdata.io/schemas/data-package.json) and GeoJSON
    (http://json.schemastore.org/geojson.json). Everything the profile itself states is checked."""
    profile = json.loads((OFFICIAL / "camtrap-dp-profile.json").read_text())
    stub = Resource.from_contents({}, default_specification=DRAFT4)
    registry = Registry().with_resources(
        [
            ("https://specs.frictionlessdata.io/schemas/data-package.json", stub),
            ("http://json.schemastore.org/geojson.json", stub),
        ]
    )
    return Draft4Validator(profile, registry=registry, format_checker=Draft4Validator.FORMAT_CHECKER)


def _frictionless_report(folder: Path) -> Any:
    """Validate the package with the standard's own table schemas (read from ../shared/camtrap-dp),
    foreign keys included; the remote profile URL is checked separately with jsonschema."""
    descriptor = json.loads((folder / "datapackage.json").read_text())
    for resource in descriptor["resources"]:
        if resource["name"] in ("deployments", "media", "observations"):
            resource["schema"] = json.loads((OFFICIAL / f"{resource['name']}-table-schema.json").read_text())
    descriptor["profile"] = "data-package"
    return Package(descriptor, basepath=str(folder)).validate()


@needs_official
def test_camtrap_reference_files_validate_the_standards_own_example() -> None:
    example = json.loads((OFFICIAL / "example" / "datapackage.json").read_text())
    assert list(_profile_validator().iter_errors(example)) == []
    assert _frictionless_report(OFFICIAL / "example").valid


@needs_official
def test_camtrap_package_passes_the_standards_checks(
    database_url: str, redis_client: redis.Redis, redis_url: str, dataset: Dataset, db: Any, tmp_path: Path
) -> None:
    status, fields = export(database_url, redis_url, tmp_path / "out", params("camtrap-dp", days=60))
    assert status == "completed"
    folder = tmp_path / "pkg"
    with zipfile.ZipFile(fields["file_uri"]) as zf:
        assert sorted(zf.namelist()) == ["datapackage.json", "deployments.csv", "media.csv", "observations.csv"]
        zf.extractall(folder)
    descriptor = json.loads((folder / "datapackage.json").read_text())
    assert [str(e.message) for e in _profile_validator().iter_errors(descriptor)] == []
    report = _frictionless_report(folder)
    assert report.valid, report.flatten(["type", "note"])[:10]
    observations = list(csv.DictReader((folder / "observations.csv").open()))
    assert len(observations) == sql_detections(db, start=TODAY - dt.timedelta(days=60), end=TODAY, sites=None)
    assigned = [o for o in observations if o["individualID"]]
    assert {int(o["individualID"]) for o in assigned} == set(dataset.deer)
    assert {o["classificationMethod"] for o in observations} == {"human", "machine"}
    assert {o["classificationProbability"] for o in observations if o["classificationMethod"] == "machine"} == {
        "0.41",
        "0.87",
    }
    # Negative control: the same check catches a broken foreign key.
    text = (folder / "observations.csv").read_text().splitlines()
    parts = text[1].split(",")
    parts[2] = "999999"
    (folder / "observations.csv").write_text("\n".join([text[0], ",".join(parts), *text[2:]]) + "\n")
    assert not _frictionless_report(folder).valid


def test_a_failure_is_one_clear_line(
    database_url: str, redis_client: redis.Redis, redis_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    site = factories.site(db)
    cam = db.execute("INSERT INTO cameras (site_id, name) VALUES (%s, 'nowhere') RETURNING id", (site,)).fetchone()
    factories.image(db, camera_id=cam["id"])
    status, fields = export(database_url, redis_url, tmp_path, params("camtrap-dp"))
    assert status == "failed"
    assert fields["error"] == f"camera {cam['id']} (nowhere) has no coordinates; Camtrap DP requires them"
    assert "\n" not in fields["error"] and "Traceback" not in fields["error"]
    assert list(tmp_path.iterdir()) == []


def test_a_runner_whose_job_was_deleted_removes_its_file(
    database_url: str, redis_client: redis.Redis, redis_url: str, dataset: Dataset, tmp_path: Path
) -> None:
    p = params("csv")
    job_id = new_job(redis_url, tmp_path, p)
    redis_client.delete(scripts.job_key(job_id))
    status = run_export(database_url, job_id=job_id, params=p, redis_url=redis_url, export_dir=str(tmp_path), lease_s=2)
    assert status == "gone"
    assert list(tmp_path.iterdir()) == []
    assert redis_client.exists(scripts.job_key(job_id)) == 0


def test_a_running_export_reports_no_made_up_progress(redis_url: str, tmp_path: Path) -> None:
    """Progress is not guessed from the number of batches: 0 while processing, 1 once completed."""
    job_id = new_job(redis_url, tmp_path, params("csv"))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = scripts.job_key(job_id)
    lease = RunnerLease(client, job_id, lease_s=0.3)
    assert lease.renew(progress=0.0)
    before = client.hget(key, "updated_at")
    heartbeat = Heartbeat(lease, interval_s=0.1)
    heartbeat.start()
    try:
        for _ in range(60):  # sixty batches written
            heartbeat.check()
        for _ in range(200):  # until the heartbeat has renewed the lease at least once
            if client.hget(key, "updated_at") != before:
                break
            heartbeat.gone.wait(0.05)
        assert client.hget(key, "updated_at") != before, "the heartbeat never renewed the lease"
        assert float(client.hget(key, "progress") or 0) == 0.0
    finally:
        heartbeat.stop()
    assert lease.finish("completed", download_url="/x", progress=1.0)
    assert float(client.hget(key, "progress") or 0) == 1.0
    client.close()
