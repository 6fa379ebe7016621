"""Load the synthetic demo data set: sites, cameras, deer profiles, images and detections.

``python -m batch.demo_data --sites 2 --cameras 6 --deer 40 --images 3000 --seed 7`` writes
1280x720 JPEGs under the image root and the matching rows. Three detections per deer profile
are manual assignments (the starting gallery); the rest are unassigned. A quarter as many extra
individuals again never get a profile (strangers the matcher should leave unassigned). The true
individual of every detection goes to ``demo_ground_truth``. Same seed, same bytes; loading
twice with the same parameters changes nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from batch.demo_render import make_individual, night_hour, render_frame
from serve_app.config import get_settings
from serve_app.store.db import connect

logger = logging.getLogger(__name__)

GALLERY_PER_DEER = 3
SPAN_DAYS = 300
SITE_PREFIX = "Demo site"


@dataclass(frozen=True)
class DemoParams:
    """What defines a demo data set."""

    sites: int
    cameras: int
    deer: int
    images: int
    seed: int

    def strangers(self) -> int:
        """Individuals that appear on camera but have no profile."""
        return max(1, self.deer // 4)

    def signature(self) -> str:
        """A short digest of the parameters, stored with the data set."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Frame:
    """One planned frame: who, where, when, and the seed of its pixels."""

    index: int
    camera: int  # 0-based camera number
    individual: int  # 0-based; >= params.deer means a stranger
    offset_s: int  # seconds before the anchor
    frame_seed: int


def plan(params: DemoParams) -> list[Frame]:
    """Deterministic frame plan: individuals live at one site and show up on its cameras."""
    if params.sites < 1 or params.cameras < params.sites or params.deer < params.sites or params.images < 1:
        raise ValueError("need at least one site, one camera and one deer per site, and one image")
    rng = random.Random(params.seed)
    total = params.deer + params.strangers()
    cams_by_site = {s: [c for c in range(params.cameras) if c % params.sites == s] for s in range(params.sites)}
    frames = []
    for k in range(params.images):
        # Every profile gets its gallery frames first; then a skewed mix of everyone.
        individual = k if k < params.deer * GALLERY_PER_DEER and k < params.images else None
        individual = (k % params.deer) if individual is not None else int(rng.paretovariate(1.2) * 7) % total
        site = individual % params.sites
        camera = rng.choice(cams_by_site[site])
        frames.append(Frame(k, camera, individual, rng.randint(0, SPAN_DAYS * 86400 - 1), rng.getrandbits(48)))
    return frames


def _render(args: tuple[int, Frame, int, str]) -> tuple[int, tuple[float, float, float, float]]:
    seed, frame, hour, path = args
    data, bbox = render_frame(
        make_individual(seed, frame.individual), frame_seed=frame.frame_seed, night=night_hour(hour)
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return frame.index, bbox


def image_uri(params: DemoParams, frame: Frame) -> str:
    """Image URI relative to the image root."""
    return f"demo-{params.signature()}/cam{frame.camera + 1:02d}/{frame.index:05d}.jpg"


def _stored_capture_times(conn: psycopg.Connection[Any], params: DemoParams) -> dict[str, dt.datetime]:
    """URI -> captured_at of this data set's image rows (the hour decides a frame's day or night look)."""
    rows = conn.execute(
        "SELECT i.uri, i.captured_at FROM images i JOIN cameras c ON c.id = i.camera_id"
        " JOIN sites s ON s.id = c.site_id WHERE s.name LIKE %s",
        (f"{SITE_PREFIX} % [{params.signature()}]",),
    ).fetchall()
    return {str(r["uri"]): r["captured_at"] for r in rows}


def _render_all(
    jobs: list[tuple[int, Frame, int, str]], *, workers: int | None
) -> dict[int, tuple[float, float, float, float]]:
    """Render frames in worker processes; returns each frame's bbox by frame index."""
    bboxes: dict[int, tuple[float, float, float, float]] = {}
    if not jobs:
        return bboxes
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for done, (index, bbox) in enumerate(pool.map(_render, jobs, chunksize=16), start=1):
            bboxes[index] = bbox
            if done % 500 == 0:
                logger.info("rendered %d/%d frames", done, len(jobs))
    return bboxes


def load_demo(dsn: str, *, image_root: Path, params: DemoParams, workers: int | None = None) -> dict[str, Any]:
    """Render the frames and write the rows; when the rows are there already, render only missing files.

    Rows alone are not enough: ``.data/`` may have been removed, or another checkout with another
    image root loaded the same set into this database. Frames are deterministic, so a missing file
    is rendered again from the plan and its stored capture time; present files are only stat-ed.
    """
    image_root = image_root.resolve()
    anchor = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    frames = plan(params)
    with connect(dsn) as conn:
        stored = _stored_capture_times(conn, params)
        if len(stored) == params.images and all(image_uri(params, f) in stored for f in frames):
            jobs = [
                (params.seed, f, stored[uri].astimezone(dt.UTC).hour, str(image_root / uri))
                for f in frames
                if not (image_root / (uri := image_uri(params, f))).is_file()
            ]
            _render_all(jobs, workers=workers)
            logger.info("demo data set %s already loaded; rendered %d missing file(s)", params.signature(), len(jobs))
            return {"loaded": False, "signature": params.signature(), "images": params.images, "rendered": len(jobs)}
        captured = [anchor - dt.timedelta(seconds=f.offset_s) for f in frames]
        jobs = [(params.seed, f, captured[f.index].hour, str(image_root / image_uri(params, f))) for f in frames]
        bboxes = _render_all(jobs, workers=workers)
        _write_rows(conn, params, frames, captured, bboxes)
        conn.commit()
    return {"loaded": True, "signature": params.signature(), "images": params.images, "rendered": len(jobs)}


def _reserve_ids(conn: psycopg.Connection[Any], table: str, count: int) -> list[int]:
    """``count`` new ids from the table's sequence (as identification takes them, so a running app's inserts
    never collide with them): an id that audit rows keep is never reused."""
    rows = conn.execute(
        "SELECT nextval(pg_get_serial_sequence(%s, 'id')) AS id FROM generate_series(1, %s) ORDER BY 1",
        (table, count),
    ).fetchall()
    return [int(row["id"]) for row in rows]


def _write_rows(
    conn: psycopg.Connection[Any],
    params: DemoParams,
    frames: list[Frame],
    captured: list[dt.datetime],
    bboxes: dict[int, tuple[float, float, float, float]],
) -> None:
    sig = params.signature()
    # A partial earlier load is replaced whole: a plain site delete takes its detections, merges and all
    # (migration 007); the review events about them stay.
    conn.execute("DELETE FROM sites WHERE name LIKE %s", (f"{SITE_PREFIX} % [{sig}]",))
    site_ids = []
    for s in range(params.sites):
        row = conn.execute("INSERT INTO sites (name) VALUES (%s) RETURNING id", (f"{SITE_PREFIX} {s + 1} [{sig}]",))
        site_ids.append(int(row.fetchone()["id"]))  # type: ignore[index]
    camera_ids = []
    for c in range(params.cameras):
        site = c % params.sites
        row = conn.execute(
            "INSERT INTO cameras (site_id, name, latitude, longitude) VALUES (%s, %s, %s, %s) RETURNING id",
            (site_ids[site], f"Camera {c + 1:02d}", round(44.9 + 0.01 * c, 5), round(-93.3 + 0.013 * c, 5)),
        )
        camera_ids.append(int(row.fetchone()["id"]))  # type: ignore[index]
    deer_ids = []
    for d in range(params.deer):
        ind = make_individual(params.seed, d)
        row = conn.execute(
            "INSERT INTO deer (site_id, name, sex, notes) VALUES (%s, %s, %s, 'demo profile') RETURNING id",
            (
                site_ids[d % params.sites],
                f"{'Buck' if ind.tines else 'Doe'} {d + 1:02d}",
                "male" if ind.tines else "female",
            ),
        )
        deer_ids.append(int(row.fetchone()["id"]))  # type: ignore[index]
    image_ids = _reserve_ids(conn, "images", len(frames))
    with conn.cursor().copy("COPY images (id, camera_id, uri, captured_at, width, height) FROM STDIN") as copy:
        for f in frames:
            copy.write_row(
                (image_ids[f.index], camera_ids[f.camera], image_uri(params, f), captured[f.index], 1280, 720)
            )
    detection_ids = _reserve_ids(conn, "detections", len(frames))
    gallery_left = dict.fromkeys(range(params.deer), GALLERY_PER_DEER)
    with conn.cursor().copy(
        "COPY detections (id, image_id, bbox_x, bbox_y, bbox_w, bbox_h, confidence, deer_id, decision) FROM STDIN"
    ) as copy:
        for f in frames:
            manual = f.individual < params.deer and gallery_left[f.individual] > 0
            if manual:
                gallery_left[f.individual] -= 1
            x, y, w, h = bboxes[f.index]
            copy.write_row(
                (
                    detection_ids[f.index],
                    image_ids[f.index],
                    x,
                    y,
                    w,
                    h,
                    0.9,
                    deer_ids[f.individual] if manual else None,
                    "manual" if manual else "unassigned",
                )
            )
    with conn.cursor().copy("COPY demo_ground_truth (detection_id, individual, deer_id) FROM STDIN") as copy:
        for f in frames:
            profile = deer_ids[f.individual] if f.individual < params.deer else None
            copy.write_row((detection_ids[f.index], f.individual, profile))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--deer", type=int, default=40)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--image-root", type=Path, help="default: TRAILCAM_IMAGE_ROOT")
    parser.add_argument("--database-url", help="default: TRAILCAM_DATABASE_URL")
    parser.add_argument("--workers", type=int, help="render processes (default: all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = get_settings()
    params = DemoParams(args.sites, args.cameras, args.deer, args.images, args.seed)
    try:
        result = load_demo(
            args.database_url or settings.database_dsn,
            image_root=args.image_root or settings.image_root,
            params=params,
            workers=args.workers,
        )
    except ValueError as exc:
        parser.error(str(exc))
    state = "loaded" if result["loaded"] else f"already loaded, {result['rendered']} missing image file(s) rendered"
    print(f"demo data set {result['signature']}: {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
