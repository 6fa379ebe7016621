"""Camtrap DP import: the standard's example package, individuals, rejection, and an export that validates again."""

from __future__ import annotations

import csv
import datetime as dt
import io
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from batch.camtrap_validation import PackageRejected, validate_package
from batch.import_camtrap_dp import import_package, main
from serve_app.exports.camtrap import write_package
from serve_app.store.db import connect
from tests.fixtures.camtrap_official import OFFICIAL, needs_official

EXAMPLE = OFFICIAL / "example"
pytestmark = needs_official  # the standard's own example package


def _csv(folder: Path, name: str) -> list[dict[str, str]]:
    with (folder / f"{name}.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_csv(folder: Path, name: str, rows: list[dict[str, str]]) -> None:
    with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _expected_detections(folder: Path) -> list[dict[str, str]]:
    local = {m["mediaID"] for m in _csv(folder, "media") if (folder / "media" / m["fileName"]).is_file()}
    return [
        o
        for o in _csv(folder, "observations")
        if o["mediaID"] in local and o["bboxX"] and o["observationType"] == "animal"
    ]


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A writable copy of the standard's example package."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "package"))


def test_example_package_imports_and_a_second_import_adds_nothing(
    database_url: str, db: psycopg.Connection[Any], package: Path, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    summary = import_package(database_url, package, media_root=package / "media", image_root=root)
    expected = _expected_detections(package)
    assert (summary.cameras, summary.images, summary.media_without_file) == (4, 10, 423 - 10)
    assert summary.detections == len(expected) > 0
    assert db.execute("SELECT count(*) AS n FROM images").fetchone()["n"] == 10
    uris = [r["uri"] for r in db.execute("SELECT uri FROM images")]
    assert all((root / uri).is_file() for uri in uris)
    boxes = sorted(
        (round(r["bbox_x"], 5), round(r["bbox_y"], 5))
        for r in db.execute("SELECT bbox_x, bbox_y FROM detections WHERE decision = 'unassigned'")
    )
    assert boxes == sorted((round(float(o["bboxX"]), 5), round(float(o["bboxY"]), 5)) for o in expected)
    again = import_package(database_url, package, media_root=package / "media", image_root=root)
    assert (again.images, again.detections, again.media_already_imported) == (0, 0, 10)
    assert db.execute("SELECT count(*) AS n FROM detections").fetchone()["n"] == len(expected)


def test_individual_ids_become_profiles_with_manual_assignments(
    database_url: str, db: psycopg.Connection[Any], package: Path, tmp_path: Path
) -> None:
    observations = _csv(package, "observations")
    chosen = [o["observationID"] for o in _expected_detections(package)][:3]
    for obs in observations:
        if obs["observationID"] in chosen:
            obs["individualID"] = "Reinaert" if obs["observationID"] != chosen[2] else "Isengrim"
    _write_csv(package, "observations", observations)
    summary = import_package(
        database_url, package, media_root=package / "media", image_root=tmp_path, site_name="Fox hill"
    )
    assert (summary.deer, summary.manual_assignments) == (2, 3)
    rows = db.execute(
        "SELECT de.name, count(*) AS n FROM detections d JOIN deer de ON de.id = d.deer_id"
        " JOIN sites s ON s.id = de.site_id WHERE d.decision = 'manual' AND s.name = 'Fox hill' GROUP BY de.name"
    ).fetchall()
    assert {r["name"]: r["n"] for r in rows} == {"Reinaert": 2, "Isengrim": 1}


def test_invalid_package_is_rejected_with_a_report_and_nothing_written(
    database_url: str, db: psycopg.Connection[Any], package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    observations = _csv(package, "observations")
    observations[4]["observationType"] = "dragon"
    observations[6]["bboxX"] = "left"
    _write_csv(package, "observations", observations)
    with pytest.raises(PackageRejected) as caught:
        validate_package(package)
    text = caught.value.report()
    assert "observations row 6 field observationType: constraint-error" in text
    assert "observations row 8 field bboxX: type-error" in text
    status = main([str(package), "--media-root", str(package / "media"), "--database-url", database_url,
                   "--image-root", str(tmp_path)])  # fmt: skip
    assert status == 1 and "observationType" in capsys.readouterr().err
    assert db.execute("SELECT count(*) AS n FROM images").fetchone()["n"] == 0
    assert db.execute("SELECT count(*) AS n FROM sites").fetchone()["n"] == 0


def test_export_of_the_imported_range_validates_again(
    database_url: str, db: psycopg.Connection[Any], package: Path, tmp_path: Path
) -> None:
    summary = import_package(database_url, package, media_root=package / "media", image_root=tmp_path / "images")
    span = db.execute("SELECT min(captured_at) AS lo, max(captured_at) AS hi FROM images").fetchone()
    params = {
        "start_date": span["lo"].astimezone(dt.UTC).date().isoformat(),
        "end_date": span["hi"].astimezone(dt.UTC).date().isoformat(),
        "group_by": "day",
        "format": "camtrap-dp",
        "site_ids": [summary.site_id],
    }
    sink = io.BytesIO()
    with connect(database_url) as conn:
        count = write_package(
            conn, sink, job_id=str(uuid.uuid4()), params=params, scientific_name="Capreolus", check=lambda: None
        )
    assert count == summary.detections
    out = tmp_path / "export"
    with zipfile.ZipFile(io.BytesIO(sink.getvalue())) as zf:
        zf.extractall(out)
    validate_package(out)  # raises PackageRejected when the export breaks the standard
    assert len(_csv(out, "media")) == summary.images
    assert len(_csv(out, "deployments")) == len({m["deploymentID"] for m in _csv(out, "media")})
