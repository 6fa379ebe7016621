"""Export test helpers: a small sighting dataset, the direct count its summaries add up to, and extra Serve apps."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from ray import serve

from serve_app.app import build_app
from tests import factories
from tests.fixtures.ray_cluster import app_settings, small_app_args, wait_ready

TODAY = dt.datetime.now(dt.UTC).date()


@dataclass
class Dataset:
    """Two sites with two cameras each, three deer, detections spread over the last 40 days."""

    sites: list[int]
    cameras: list[int]
    deer: list[int]
    detections: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def make_dataset(conn: psycopg.Connection[Any], *, days: int = 40, per_day: int = 1) -> Dataset:
    """Insert the dataset; a few detections fall outside every tested range (older than 400 days)."""
    sites = [factories.site(conn) for _ in range(2)]
    cameras = [factories.camera(conn, site_id=s) for s in sites for _ in range(2)]
    deer = [factories.deer(conn, site_id=sites[0]), factories.deer(conn, site_id=sites[0])]
    deer.append(factories.deer(conn, site_id=sites[1]))
    count = 0
    for day in range(days):
        for n in range(per_day):
            for i, cam in enumerate(cameras):
                when = dt.datetime.combine(TODAY - dt.timedelta(days=day), dt.time(12, n % 60), tzinfo=dt.UTC)
                image = factories.image(conn, camera_id=cam, captured_at=when - dt.timedelta(minutes=i))
                site_deer = deer[:2] if i < 2 else deer[2:]
                factories.detection(conn, image_id=image, deer_id=site_deer[day % len(site_deer)])
                factories.detection(
                    conn, image_id=image, decision="review", top1_similarity=0.41, bbox=(0.5, 0.5, 0.2, 0.3)
                )
                if day % 3 == 0:
                    factories.detection(
                        conn, image_id=image, deer_id=site_deer[0], decision="auto", top1_similarity=0.87
                    )
                    count += 1
                count += 2
    old = factories.image(conn, camera_id=cameras[0], captured_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    factories.detection(conn, image_id=old)
    return Dataset(sites=sites, cameras=cameras, deer=deer, detections=count)


def sql_detections(conn: psycopg.Connection[Any], *, start: dt.date, end: dt.date, sites: list[int] | None) -> int:
    """The direct count the export summaries must add up to."""
    row = conn.execute(
        "SELECT count(*) AS n FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id"
        " WHERE i.captured_at >= %s AND i.captured_at < %s AND (%s::bigint[] IS NULL OR c.site_id = ANY(%s::bigint[]))",
        (
            dt.datetime.combine(start, dt.time(), tzinfo=dt.UTC),
            dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC),
            sites,
            sites,
        ),
    ).fetchone()
    assert row is not None
    return int(row["n"])


@pytest.fixture
def dataset(db: psycopg.Connection[Any]) -> Dataset:
    """The standard dataset in a freshly truncated database."""
    return make_dataset(db)


@pytest.fixture(scope="session")
def tuned_app(
    serve_http_port: int, database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., str]]:
    """Deploy the whole app once per distinct settings override, under its own route prefix."""
    deployed: dict[str, str] = {}

    def deploy(name: str, **overrides: Any) -> str:
        if name not in deployed:
            root = tmp_path_factory.mktemp(f"serve-{name}")
            args = small_app_args(app_settings(database_url, redis_url, root, **overrides))
            serve.run(build_app(args), name=f"exports-{name}", route_prefix=f"/{name}", blocking=False)
            url = f"http://127.0.0.1:{serve_http_port}/{name}"
            wait_ready(url)
            deployed[name] = url
        return deployed[name]

    yield deploy
    for name in deployed:
        serve.delete(f"exports-{name}")
