"""Import a Camtrap DP 1.0 package: deployments -> cameras, media -> images, observations -> detections.

``python -m batch.import_camtrap_dp PACKAGE_DIR --media-root DIR [--site NAME]``

The package is validated first against the standard's table constraints (encoded in the repository); an
invalid package is rejected with a report and nothing is written. Media with a local file (under
--media-root, by fileName or relative filePath) are copied under the image root and become images; other
media are skipped (nothing is fetched); a mediaID that is not a plain file name (``..``, ``/``, too long)
refuses the package before anything is written. Media-level animal observations with a bounding box on an
imported image become detections; an individualID becomes a deer profile of the site with a manual
assignment. Importing the same package twice adds nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import psycopg
from PIL import Image
from psycopg.rows import dict_row

from batch.camtrap_validation import PackageRejected, validate_package
from serve_app.config import get_settings
from serve_app.paths import PathRefused, confine
from serve_app.store.deer import create_deer_sync

logger = logging.getLogger(__name__)

IMPORT_DIR = "camtrap"


@dataclass
class ImportSummary:
    """What an import wrote and what it skipped."""

    site_id: int = 0
    cameras: int = 0
    images: int = 0
    media_without_file: int = 0
    media_already_imported: int = 0
    detections: int = 0
    observations_skipped: int = 0
    deer: int = 0
    manual_assignments: int = 0


def _rows(folder: Path, descriptor: dict[str, Any], name: str) -> Iterator[dict[str, str]]:
    resource = next(r for r in descriptor["resources"] if r.get("name") == name)
    with (folder / resource["path"]).open(encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle)


def _timestamp(text: str) -> dt.datetime | None:
    if not text:
        return None
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


class UnsafePaths(PackageRejected):
    """A package whose media IDs would put files outside their folder under the image root."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.args = (f"package names media that cannot be stored safely ({len(problems)} problem(s))",)


def _local_file(media: dict[str, str], media_root: Path) -> Path | None:
    """The medium's file under ``media_root`` (by relative filePath or fileName), by the one confinement rule."""
    for candidate in (media.get("filePath", ""), media.get("fileName", "")):
        try:
            path, _ = confine(candidate, root=media_root)
            if path.is_file():
                return path
        except (PathRefused, OSError):
            continue
    return None


def _destination(media: dict[str, str], source: Path, *, package_key: str, image_root: Path) -> tuple[Path, str]:
    """Where a medium's file is stored and its image URI: ``camtrap/<package>/<mediaID><suffix>``, confined."""
    folder = f"{IMPORT_DIR}/{package_key}"
    path, uri = confine(f"{folder}/{media['mediaID']}{source.suffix.lower() or '.jpg'}", root=image_root)
    if PurePosixPath(uri).parent != PurePosixPath(folder):
        raise PathRefused("outside", "the mediaID must be a plain file name")
    return path, uri


def _media_plan(
    folder: Path, descriptor: dict[str, Any], *, media_root: Path, image_root: Path, package_key: str
) -> list[tuple[dict[str, str], Path | None, Path, str]]:
    """Every medium with its local file (or None), destination and URI; refuses the package before any write."""
    plan: list[tuple[dict[str, str], Path | None, Path, str]] = []
    problems = []
    for row, media in enumerate(_rows(folder, descriptor, "media"), start=2):
        source = _local_file(media, media_root)
        if source is None:
            plan.append((media, None, image_root, ""))
            continue
        try:
            plan.append((media, source, *_destination(media, source, package_key=package_key, image_root=image_root)))
        except PathRefused as exc:
            problems.append(f"media row {row} field mediaID {media['mediaID'][:80]!r}: {exc}")
    if problems:
        raise UnsafePaths(problems)
    return plan


def _bbox(obs: dict[str, str]) -> tuple[float, float, float, float] | None:
    try:
        x, y, w, h = (float(obs[k]) for k in ("bboxX", "bboxY", "bboxWidth", "bboxHeight"))
    except (KeyError, ValueError):
        return None
    x, y = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
    w, h = min(w, 1.0 - x), min(h, 1.0 - y)  # rounding in the source may overshoot the frame edge
    return (x, y, w, h) if w > 0 and h > 0 else None


def _id(conn: psycopg.Connection[dict[str, Any]], sql: str, params: tuple[Any, ...]) -> int:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row["id"])


def import_package(
    dsn: str,
    folder: Path,
    *,
    media_root: Path,
    image_root: Path,
    site_name: str | None = None,
) -> ImportSummary:
    """Validate and import a package folder in one transaction."""
    descriptor = validate_package(folder)
    summary = ImportSummary()
    package_key = str(descriptor.get("id") or descriptor.get("name") or folder.name).replace("/", "_")
    plan = _media_plan(folder, descriptor, media_root=media_root, image_root=image_root, package_key=package_key)
    with psycopg.connect(dsn, row_factory=dict_row) as conn, conn.transaction():
        name = site_name or str(descriptor.get("title") or descriptor.get("name") or folder.name)
        summary.site_id = _id(
            conn,
            "INSERT INTO sites (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
            (name,),
        )
        cameras: dict[str, int] = {}
        for dep in _rows(folder, descriptor, "deployments"):
            cameras[dep["deploymentID"]] = _id(
                conn,
                "INSERT INTO cameras (site_id, name, latitude, longitude) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (site_id, name) DO UPDATE SET latitude = EXCLUDED.latitude,"
                " longitude = EXCLUDED.longitude RETURNING id",
                (summary.site_id, dep["deploymentID"], float(dep["latitude"]), float(dep["longitude"])),
            )
        summary.cameras = len(cameras)
        images: dict[str, int] = {}
        for media, source, target, uri in plan:
            if source is None:
                summary.media_without_file += 1
                continue
            with Image.open(source) as probe:
                width, height = probe.size
            row = conn.execute(
                "INSERT INTO images (camera_id, uri, captured_at, width, height) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (uri) DO NOTHING RETURNING id",
                (cameras[media["deploymentID"]], uri, _timestamp(media["timestamp"]), width, height),
            ).fetchone()
            if row is None:
                summary.media_already_imported += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            images[media["mediaID"]] = int(row["id"])
        summary.images = len(images)
        deer: dict[str, int] = {}
        for obs in _rows(folder, descriptor, "observations"):
            image_id = images.get(obs.get("mediaID", ""))
            bbox = _bbox(obs)
            if image_id is None or bbox is None or obs.get("observationType") != "animal":
                summary.observations_skipped += 1
                continue
            individual = obs.get("individualID", "")
            deer_id = None
            if individual:
                if individual not in deer:
                    found = conn.execute(
                        "SELECT id FROM deer WHERE site_id = %s AND name = %s AND merged_into IS NULL",
                        (summary.site_id, individual),
                    ).fetchone()
                    sex = obs.get("sex") if obs.get("sex") in ("male", "female") else "unknown"
                    notes = f"imported from Camtrap DP package {package_key}"
                    deer[individual] = int(found["id"]) if found else create_deer_sync(
                        conn, site_id=summary.site_id, name=individual, sex=sex, notes=notes
                    )  # fmt: skip
                    summary.deer += 0 if found else 1
                deer_id = deer[individual]
                summary.manual_assignments += 1
            probability = obs.get("classificationProbability", "")
            conn.execute(
                "INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h, confidence, deer_id, decision,"
                " reviewed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    image_id, *bbox, float(probability) if probability else None, deer_id,
                    "manual" if deer_id else "unassigned",
                    _timestamp(obs.get("classificationTimestamp", "")) if deer_id else None,
                ),
            )  # fmt: skip
            summary.detections += 1
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the summary, or the validation report and exit status 1."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="folder holding datapackage.json and the CSV tables")
    parser.add_argument("--media-root", type=Path, required=True, help="folder holding the media files")
    parser.add_argument("--site", help="site name (default: the package title)")
    parser.add_argument("--database-url", help="default: TRAILCAM_DATABASE_URL")
    parser.add_argument("--image-root", type=Path, help="default: TRAILCAM_IMAGE_ROOT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = get_settings()
    try:
        summary = import_package(
            args.database_url or settings.database_dsn,
            args.package,
            media_root=args.media_root,
            image_root=args.image_root or settings.image_root,
            site_name=args.site,
        )
    except PackageRejected as exc:
        print(exc.report(), file=sys.stderr)
        return 1
    for key, value in asdict(summary).items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
