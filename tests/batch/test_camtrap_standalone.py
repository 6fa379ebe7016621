"""Camtrap DP without the official files: a clone with no ../shared exports a package that validates and
imports it again (the table constraints are the repository's own)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from batch.camtrap_validation import PackageRejected, validate_package
from batch.import_camtrap_dp import main
from serve_app.config import get_settings
from serve_app.exports.camtrap import write_package
from serve_app.store.db import connect
from tests import factories
from tests.helpers import write_jpeg

WHEN = dt.datetime(2026, 3, 14, 6, 30, tzinfo=dt.UTC)


@pytest.fixture
def clone_without_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run from a folder with no ../shared beside it, the old schema setting pointing nowhere."""
    clone = tmp_path / "clone"
    clone.mkdir()
    assert not (clone / ".." / "shared").exists()
    monkeypatch.chdir(clone)
    get_settings.cache_clear()
    yield clone
    get_settings.cache_clear()


def _rows(folder: Path, table: str) -> list[dict[str, str]]:
    with (folder / f"{table}.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_export_validates_and_imports_again_with_no_shared_folder(
    database_url: str, db: psycopg.Connection[Any], clone_without_shared: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    site = factories.site(db, name="North ridge")
    camera = factories.camera(db, site_id=site)
    doe = factories.deer(db, site_id=site, name="Doe")
    for n in range(3):
        uri = write_jpeg(images, f"north/{n}.jpg", seed=n, size=(160, 120))
        image = factories.image(db, camera_id=camera, uri=uri, captured_at=WHEN + dt.timedelta(minutes=n))
        factories.detection(db, image_id=image, deer_id=doe)  # a person's decision
        factories.detection(db, image_id=image, decision="review", top1_similarity=0.41, bbox=(0.5, 0.5, 0.2, 0.3))
    params = {
        "start_date": WHEN.date().isoformat(),
        "end_date": (WHEN.date() + dt.timedelta(days=1)).isoformat(),
        "group_by": "day",
        "format": "camtrap-dp",
        "site_ids": [site],
    }
    sink = io.BytesIO()
    with connect(database_url) as conn:
        observations = write_package(
            conn, sink, job_id=str(uuid.uuid4()), params=params, scientific_name="Odocoileus", check=lambda: None
        )
    package = tmp_path / "package"
    with zipfile.ZipFile(sink) as zf:
        zf.extractall(package)

    validate_package(package)  # the export conforms to the tables, checked with the repository's own encoding
    assert observations == 6 and len(_rows(package, "media")) == 3

    status = main(
        [str(package), "--media-root", str(images), "--site", "Imported", "--database-url", database_url,
         "--image-root", str(tmp_path / "imported")]
    )  # fmt: skip
    assert status == 0
    counts = db.execute(
        "SELECT count(DISTINCT i.id) AS images, count(d.id) AS detections,"
        " count(d.id) FILTER (WHERE d.decision = 'manual') AS manual"
        " FROM sites s JOIN cameras c ON c.site_id = s.id JOIN images i ON i.camera_id = c.id"
        " JOIN detections d ON d.image_id = i.id WHERE s.name = 'Imported'"
    ).fetchone()
    assert (counts["images"], counts["detections"], counts["manual"]) == (3, 6, 3)
    names = [r["name"] for r in db.execute("SELECT de.name FROM deer de JOIN sites s ON s.id = de.site_id"
                                            " WHERE s.name = 'Imported'")]  # fmt: skip
    assert names == [str(doe)]


def test_a_broken_package_is_rejected_with_no_shared_folder(
    database_url: str, db: psycopg.Connection[Any], clone_without_shared: Path, tmp_path: Path
) -> None:
    site = factories.site(db)
    image = factories.image(db, camera_id=factories.camera(db, site_id=site), captured_at=WHEN)
    factories.detection(db, image_id=image)
    params = {"start_date": WHEN.date().isoformat(), "end_date": (WHEN.date() + dt.timedelta(days=1)).isoformat(),
              "group_by": "day", "format": "camtrap-dp", "site_ids": [site]}  # fmt: skip
    sink = io.BytesIO()
    with connect(database_url) as conn:
        write_package(conn, sink, job_id=str(uuid.uuid4()), params=params, scientific_name="O", check=lambda: None)
    package = tmp_path / "package"
    with zipfile.ZipFile(sink) as zf:
        zf.extractall(package)
    rows = _rows(package, "observations")
    rows[0]["observationType"] = "dragon"
    with (package / "observations.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(PackageRejected) as caught:
        validate_package(package)
    assert "observations row 2 field observationType: constraint-error" in caught.value.report()
