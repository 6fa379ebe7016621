"""Row factories for tests: small helpers that insert one row and return its id."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import psycopg

from serve_app.keys import create_key

_seq = itertools.count(1)

TEST_PEPPER = "change-me"  # the development default the test apps run with


def site(conn: psycopg.Connection[Any], *, name: str | None = None) -> int:
    """A site."""
    row = conn.execute("INSERT INTO sites (name) VALUES (%s) RETURNING id", (name or f"site-{next(_seq)}",)).fetchone()
    assert row is not None
    return int(row["id"])


def camera(conn: psycopg.Connection[Any], *, site_id: int, name: str | None = None) -> int:
    """A camera at a site."""
    row = conn.execute(
        "INSERT INTO cameras (site_id, name, latitude, longitude) VALUES (%s, %s, 45.1, -93.2) RETURNING id",
        (site_id, name or f"cam-{next(_seq)}"),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def image(
    conn: psycopg.Connection[Any],
    *,
    camera_id: int,
    captured_at: dt.datetime | None = None,
    uri: str | None = None,
    width: int = 1280,
    height: int = 720,
) -> int:
    """An image taken by a camera."""
    row = conn.execute(
        "INSERT INTO images (camera_id, uri, captured_at, width, height) VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (
            camera_id,
            uri or f"test/{next(_seq)}.jpg",
            captured_at or dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
            width,
            height,
        ),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def deer(conn: psycopg.Connection[Any], *, site_id: int, name: str | None = None) -> int:
    """A deer profile."""
    row = conn.execute(
        "INSERT INTO deer (site_id, name, sex) VALUES (%s, %s, 'unknown') RETURNING id",
        (site_id, name or f"deer-{next(_seq)}"),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def detection(
    conn: psycopg.Connection[Any],
    *,
    image_id: int,
    deer_id: int | None = None,
    decision: str | None = None,
    bbox: tuple[float, float, float, float] = (0.2, 0.2, 0.4, 0.5),
    top1_similarity: float | None = None,
) -> int:
    """A detection on an image; manual when a deer is given and no decision is."""
    decision = decision or ("manual" if deer_id else "unassigned")
    row = conn.execute(
        "INSERT INTO detections (image_id, bbox_x, bbox_y, bbox_w, bbox_h, confidence, deer_id, decision,"
        " top1_similarity) VALUES (%s, %s, %s, %s, %s, 0.9, %s, %s, %s) RETURNING id",
        (image_id, *bbox, deer_id, decision, top1_similarity),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def api_key(conn: psycopg.Connection[Any], *, sites: list[int] | None = None) -> str:
    """A key for the given sites (None: all sites), in clear."""
    return create_key(conn, sites=sites, pepper=TEST_PEPPER)
