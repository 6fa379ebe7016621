"""Demo data: deterministic bytes, the promised rows, a starting gallery and ground truth."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import psycopg
from PIL import Image

from batch.demo_data import GALLERY_PER_DEER, DemoParams, load_demo
from tests.fixtures.postgres import truncate_all

PARAMS = DemoParams(sites=2, cameras=4, deer=6, images=30, seed=7)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


def _rows(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return [
        tuple(r.values())
        for r in conn.execute(
            "SELECT i.uri, c.name AS camera, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h, d.decision, g.individual,"
            " de.name AS deer FROM detections d JOIN images i ON i.id = d.image_id"
            " JOIN cameras c ON c.id = i.camera_id JOIN demo_ground_truth g ON g.detection_id = d.id"
            " LEFT JOIN deer de ON de.id = d.deer_id ORDER BY i.uri"
        )
    ]


def test_same_seed_gives_same_bytes_and_rows(database_url: str, db: psycopg.Connection[Any], tmp_path: Path) -> None:
    load_demo(database_url, image_root=tmp_path / "a", params=PARAMS, workers=2)
    first_rows = _rows(db)
    truncate_all(database_url)
    load_demo(database_url, image_root=tmp_path / "b", params=PARAMS, workers=1)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert len(_digests(tmp_path / "a")) == PARAMS.images
    assert _rows(db) == first_rows
    other = DemoParams(sites=2, cameras=4, deer=6, images=30, seed=8)
    load_demo(database_url, image_root=tmp_path / "c", params=other, workers=2)
    assert set(_digests(tmp_path / "c").values()).isdisjoint(_digests(tmp_path / "a").values())


def test_loaded_set_has_gallery_ground_truth_and_frames(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    result = load_demo(database_url, image_root=tmp_path, params=PARAMS, workers=2)
    assert result["loaded"] is True
    counts = db.execute(
        "SELECT (SELECT count(*) FROM sites) AS sites, (SELECT count(*) FROM cameras) AS cameras,"
        " (SELECT count(*) FROM deer) AS deer, (SELECT count(*) FROM images) AS images,"
        " (SELECT count(*) FROM detections) AS detections, (SELECT count(*) FROM demo_ground_truth) AS truth"
    ).fetchone()
    assert counts == {"sites": 2, "cameras": 4, "deer": 6, "images": 30, "detections": 30, "truth": 30}
    gallery = db.execute(
        "SELECT deer_id, count(*) AS n FROM detections WHERE decision = 'manual' GROUP BY deer_id"
    ).fetchall()
    assert len(gallery) == PARAMS.deer and all(r["n"] == GALLERY_PER_DEER for r in gallery)
    assert db.execute("SELECT count(*) AS n FROM detections WHERE decision = 'unassigned'").fetchone()["n"] == 12
    # A manual assignment always names the true individual; strangers have no profile.
    wrong = db.execute(
        "SELECT count(*) AS n FROM detections d JOIN demo_ground_truth g ON g.detection_id = d.id"
        " WHERE d.decision = 'manual' AND d.deer_id IS DISTINCT FROM g.deer_id"
    ).fetchone()["n"]
    assert wrong == 0
    # Cameras and deer of one individual share a site.
    mismatched = db.execute(
        "SELECT count(*) AS n FROM demo_ground_truth g JOIN detections d ON d.id = g.detection_id"
        " JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id JOIN deer de ON de.id = g.deer_id"
        " WHERE de.site_id <> c.site_id"
    ).fetchone()["n"]
    assert mismatched == 0
    span = db.execute(
        "SELECT max(captured_at) - min(captured_at) AS span, max(captured_at) <= now() AS past FROM images"
    ).fetchone()
    assert span["past"] and span["span"].days >= 150
    uri = db.execute("SELECT uri FROM images ORDER BY id LIMIT 1").fetchone()["uri"]
    with Image.open(tmp_path / uri) as img:
        assert img.format == "JPEG" and img.size[0] >= 1280 and img.size[1] >= 720
    modes = set()
    for path in sorted(tmp_path.rglob("*.jpg")):
        with Image.open(path) as img:
            r, g, b = img.convert("RGB").resize((8, 8)).split()
            modes.add("grey" if r.tobytes() == g.tobytes() == b.tobytes() else "colour")
    assert modes == {"grey", "colour"}


def test_loading_twice_is_a_no_op(database_url: str, db: psycopg.Connection[Any], tmp_path: Path) -> None:
    load_demo(database_url, image_root=tmp_path, params=PARAMS, workers=2)
    ids = db.execute("SELECT id FROM detections ORDER BY id").fetchall()
    assert load_demo(database_url, image_root=tmp_path, params=PARAMS, workers=2)["loaded"] is False
    assert db.execute("SELECT id FROM detections ORDER BY id").fetchall() == ids


def test_a_set_missing_rows_is_loaded_again_whole(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    load_demo(database_url, image_root=tmp_path, params=PARAMS, workers=2)
    rows = _rows(db)
    db.execute("DELETE FROM images WHERE id = (SELECT min(id) FROM images)")  # no longer the whole set
    assert load_demo(database_url, image_root=tmp_path, params=PARAMS, workers=2)["loaded"] is True
    assert _rows(db) == rows
    assert db.execute("SELECT count(*) AS n FROM sites").fetchone()["n"] == PARAMS.sites


def _table_rows(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: [tuple(r.values()) for r in conn.execute(f"SELECT * FROM {table} ORDER BY 1")]
        for table in ("sites", "cameras", "deer", "images", "detections", "demo_ground_truth")
    }


def test_a_loaded_set_whose_files_were_removed_gets_them_back(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """`rm -rf .data` (or another checkout's image root) with the rows still in Postgres: the files come back."""
    load_demo(database_url, image_root=tmp_path, params=PARAMS, workers=2)
    digests = _digests(tmp_path)
    rows = _table_rows(db)
    removed = sorted(tmp_path.rglob("*.jpg"))[::3]
    for path in removed:
        path.unlink()
    result = load_demo(database_url, image_root=tmp_path, params=PARAMS, workers=2)
    assert _digests(tmp_path) == digests  # the same bytes as the first load
    assert result["loaded"] is False and result["rendered"] == len(removed)
    assert _table_rows(db) == rows

    elsewhere = tmp_path / "other-checkout"
    result = load_demo(database_url, image_root=elsewhere, params=PARAMS, workers=2)
    assert result["rendered"] == PARAMS.images
    assert _digests(elsewhere) == digests
    assert _table_rows(db) == rows


def test_a_complete_set_renders_nothing_again(database_url: str, db: psycopg.Connection[Any], tmp_path: Path) -> None:
    first = load_demo(database_url, image_root=tmp_path, params=PARAMS, workers=2)
    assert first["rendered"] == PARAMS.images
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")}
    again = load_demo(database_url, image_root=tmp_path, params=PARAMS, workers=2)
    assert again == {"loaded": False, "signature": PARAMS.signature(), "images": PARAMS.images, "rendered": 0}
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")} == mtimes
