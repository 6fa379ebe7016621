"""Camtrap DP import: a package's mediaID and file names go through the one path-confinement rule, so a
hostile package is refused with a report and nothing is written outside (or inside) the image root."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest

from batch.camtrap_validation import PackageRejected, validate_package
from batch.import_camtrap_dp import import_package, main
from tests.fixtures.camtrap_official import OFFICIAL, needs_official

EXAMPLE = OFFICIAL / "example"
pytestmark = needs_official  # the standard's own example package


def _media(folder: Path) -> list[dict[str, str]]:
    with (folder / "media.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_media(folder: Path, rows: list[dict[str, str]]) -> None:
    _write(folder, "media", rows)


def _write(folder: Path, name: str, rows: list[dict[str, str]]) -> None:
    with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _rename_media(folder: Path, old: str, new: str) -> None:
    """Give a medium another mediaID, in media and in the observations that refer to it (a valid package)."""
    for name in ("media", "observations"):
        with (folder / f"{name}.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            if row.get("mediaID") == old:
                row["mediaID"] = new
        _write(folder, name, rows)


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return Path(shutil.copytree(EXAMPLE, tmp_path / "package"))


@pytest.mark.parametrize("media_id", ["../../../escaped", "../../escaped", "a" * 300, "/tmp/escaped"])
def test_a_hostile_media_id_is_refused_and_nothing_is_written(
    database_url: str, db: psycopg.Connection[Any], package: Path, tmp_path: Path, media_id: str
) -> None:
    rows = _media(package)
    local = next(m for m in rows if (package / "media" / m["fileName"]).is_file())
    _rename_media(package, local["mediaID"], media_id)
    validate_package(package)  # a valid package: only the importer's confinement can refuse it
    root = tmp_path / "data" / "images"
    root.mkdir(parents=True)
    before = _files(tmp_path)
    with pytest.raises(PackageRejected) as caught:
        import_package(database_url, package, media_root=package / "media", image_root=root)
    assert "mediaID" in caught.value.report()
    assert _files(tmp_path) == before
    status = main([str(package), "--media-root", str(package / "media"), "--database-url", database_url,
                   "--image-root", str(root)])  # fmt: skip
    assert status == 1
    assert _files(tmp_path) == before
    for table in ("sites", "cameras", "images", "detections"):
        assert db.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"] == 0, table


def test_an_unusable_file_name_is_a_medium_without_a_file_not_a_crash(
    database_url: str, db: psycopg.Connection[Any], package: Path, tmp_path: Path
) -> None:
    rows = _media(package)
    local = [i for i, m in enumerate(rows) if (package / "media" / m["fileName"]).is_file()]
    rows[local[0]]["fileName"] = "b" * 300 + ".JPG"
    rows[local[1]]["fileName"] = "../" + rows[local[1]]["fileName"]
    _write_media(package, rows)
    root = tmp_path / "images"
    summary = import_package(database_url, package, media_root=package / "media", image_root=root)
    assert summary.images == len(local) - 2
    assert summary.media_without_file == len(rows) - len(local) + 2
    assert all(p.is_relative_to(root) for p in _files(tmp_path) - _files(package))
