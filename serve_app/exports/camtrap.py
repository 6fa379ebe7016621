"""Camtrap DP 1.0.2 packages: a zip of datapackage.json, deployments.csv, media.csv, observations.csv.

Cameras are deployments (active span = first to last image in the range), images are media,
detections are media-level observations: individualID is the deer id, the bbox is relative,
classificationMethod is human for manual assignments and machine otherwise, with the top-1
similarity as classificationProbability for machine classifications.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import mimetypes
import zipfile
from typing import Any

import psycopg

from serve_app.exports.camtrap_tables import DEPLOYMENTS, MEDIA, OBSERVATIONS, TABLES, VERSION
from serve_app.exports.summary import Check, iso_utc, query_args, stream_rows

SCHEMA_BASE = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}/"
PROFILE_URL = SCHEMA_BASE + "camtrap-dp-profile.json"
_RANGE = """i.captured_at >= %(start)s AND i.captured_at < %(end)s
  AND (%(sites)s::bigint[] IS NULL OR c.site_id = ANY(%(sites)s::bigint[]))"""

DEPLOYMENTS_SQL = f"""
SELECT c.id, c.name, c.latitude, c.longitude, s.name AS site_name,
       min(i.captured_at) AS first_at, max(i.captured_at) AS last_at
FROM cameras c JOIN sites s ON s.id = c.site_id JOIN images i ON i.camera_id = c.id
WHERE {_RANGE}
GROUP BY c.id, s.name ORDER BY c.id
"""
MEDIA_SQL = f"""
SELECT i.id, i.camera_id, i.uri, i.captured_at
FROM images i JOIN cameras c ON c.id = i.camera_id
WHERE {_RANGE} ORDER BY i.id
"""
OBSERVATIONS_SQL = f"""
SELECT d.id, i.camera_id, d.image_id, i.captured_at, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h,
       d.deer_id, d.decision, d.top1_similarity, d.model_version, d.created_at, d.reviewed_by,
       d.reviewed_at, dr.sex
FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id
LEFT JOIN deer dr ON dr.id = d.deer_id
WHERE {_RANGE} ORDER BY d.id
"""


def iso_s(value: dt.datetime | None) -> str | None:
    """Camtrap DP datetimes: ``%Y-%m-%dT%H:%M:%S%z``, so whole seconds."""
    return iso_utc(value.replace(microsecond=0)) if value is not None else None


class CamtrapError(ValueError):
    """The data cannot be expressed as a valid Camtrap DP package."""


def _file_path(uri: str) -> str:
    """A relative media path: Camtrap DP forbids leading '/', '.', '~' and '..' segments."""
    path = uri.split("://", 1)[-1].lstrip("/.~")
    return "/".join(part for part in path.split("/") if part not in ("", ".", ".."))


def _deployment(row: dict[str, Any]) -> dict[str, Any]:
    if row["latitude"] is None or row["longitude"] is None:
        raise CamtrapError(f"camera {row['id']} ({row['name']}) has no coordinates; Camtrap DP requires them")
    return {
        "deploymentID": str(row["id"]),
        "locationID": str(row["id"]),
        "locationName": f"{row['site_name']} / {row['name']}",
        "latitude": row["latitude"],
        "longitude": row["longitude"],
        "deploymentStart": iso_s(row["first_at"]),
        "deploymentEnd": iso_s(row["last_at"]),
        "cameraID": row["name"],
        "deploymentGroups": f"site:{row['site_name']}",
    }


def _media(row: dict[str, Any]) -> dict[str, Any]:
    path = _file_path(row["uri"])
    return {
        "mediaID": str(row["id"]),
        "deploymentID": str(row["camera_id"]),
        "captureMethod": "activityDetection",
        "timestamp": iso_s(row["captured_at"]),
        "filePath": path or str(row["id"]),
        "filePublic": "false",
        "fileName": path.rsplit("/", 1)[-1] or None,
        "fileMediatype": mimetypes.guess_type(path)[0] or "image/jpeg",
    }


def _observation(row: dict[str, Any], scientific_name: str) -> dict[str, Any]:
    human = row["decision"] == "manual"
    similarity = row["top1_similarity"]
    when = row["reviewed_at"] if human else row["created_at"]
    return {
        "observationID": str(row["id"]),
        "deploymentID": str(row["camera_id"]),
        "mediaID": str(row["image_id"]),
        "eventStart": iso_s(row["captured_at"]),
        "eventEnd": iso_s(row["captured_at"]),
        "observationLevel": "media",
        "observationType": "animal",
        "scientificName": scientific_name,
        "count": 1,
        "sex": row["sex"] if row["sex"] in ("female", "male") else None,
        "individualID": str(row["deer_id"]) if row["deer_id"] is not None else None,
        "bboxX": row["bbox_x"],
        "bboxY": row["bbox_y"],
        "bboxWidth": row["bbox_w"],
        "bboxHeight": row["bbox_h"],
        "classificationMethod": "human" if human else "machine",
        "classifiedBy": (f"api key {row['reviewed_by']}" if row["reviewed_by"] else None)
        if human
        else f"trailcam-reid {row['model_version'] or ''}".strip(),
        "classificationTimestamp": iso_s(when),
        "classificationProbability": (
            None if human or similarity is None else round(min(1.0, max(0.0, float(similarity))), 6)
        ),
    }


def _write_table(zf: zipfile.ZipFile, name: str, columns: tuple[str, ...], rows: Any) -> int:
    """One CSV table with every column of the standard in its order (unused ones stay empty)."""
    count = 0
    with zf.open(f"{name}.csv", "w", force_zip64=True) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        for batch in rows:
            writer.writerows(batch)
            count += len(batch)
        text.flush()
        text.detach()
    return count


def _spatial(deployments: list[dict[str, Any]]) -> dict[str, Any]:
    """GeoJSON coverage: the cameras' bounding box (a point for one place)."""
    if not deployments:
        return {"type": "GeometryCollection", "geometries": []}
    lats = [d["latitude"] for d in deployments]
    lons = [d["longitude"] for d in deployments]
    if min(lats) == max(lats) or min(lons) == max(lons):
        return {"type": "Point", "coordinates": [lons[0], lats[0]]}
    ring = [[min(lons), min(lats)], [max(lons), min(lats)], [max(lons), max(lats)], [min(lons), max(lats)]]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


def descriptor(
    *, job_id: str, params: dict[str, Any], deployments: list[dict[str, Any]], scientific_name: str
) -> dict[str, Any]:
    """datapackage.json for the package."""
    starts = [d["deploymentStart"][:10] for d in deployments]
    ends = [d["deploymentEnd"][:10] for d in deployments]
    return {
        "resources": [
            {
                "name": table,
                "path": f"{table}.csv",
                "profile": "tabular-data-resource",
                "format": "csv",
                "mediatype": "text/csv",
                "encoding": "utf-8",
                "schema": f"{SCHEMA_BASE}{table}-table-schema.json",
            }
            for table in TABLES
        ],
        "profile": PROFILE_URL,
        "name": f"trailcam-reid-export-{job_id[:8]}",
        "id": job_id,
        "created": iso_s(dt.datetime.now(dt.UTC)),
        "title": f"trailcam-reid deer sightings {params['start_date']} to {params['end_date']}",
        "contributors": [{"title": "trailcam-reid", "role": "publisher"}],
        "version": "1.0",
        "project": {
            "title": "trailcam-reid deer re-identification",
            "samplingDesign": "opportunistic",
            "captureMethod": ["activityDetection"],
            "individualAnimals": True,
            "observationLevel": ["media"],
        },
        "spatial": _spatial(deployments),
        "temporal": {"start": min(starts, default=params["start_date"]), "end": max(ends, default=params["end_date"])},
        "taxonomic": [{"scientificName": scientific_name, "taxonRank": "species"}],
    }


def write_package(
    conn: psycopg.Connection[Any], sink: Any, *, job_id: str, params: dict[str, Any], scientific_name: str, check: Check
) -> int:
    """Write the zip to a binary stream; returns the number of observations."""
    args = query_args(params)
    deployments = [
        _deployment(row)
        for batch in stream_rows(conn, DEPLOYMENTS_SQL, args, check=check, name="camtrap_deployments")
        for row in batch
    ]
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        _write_table(zf, "deployments", DEPLOYMENTS.columns, [deployments])
        media = stream_rows(conn, MEDIA_SQL, args, check=check, name="camtrap_media")
        _write_table(zf, "media", MEDIA.columns, ([_media(r) for r in batch] for batch in media))
        observations = stream_rows(conn, OBSERVATIONS_SQL, args, check=check, name="camtrap_observations")
        count = _write_table(
            zf,
            "observations",
            OBSERVATIONS.columns,
            ([_observation(r, scientific_name) for r in batch] for batch in observations),
        )
        package = descriptor(job_id=job_id, params=params, deployments=deployments, scientific_name=scientific_name)
        zf.writestr("datapackage.json", json.dumps(package, indent=2))
    return count
