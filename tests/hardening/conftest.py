"""Hardening helpers: extra Serve apps pointed at private services, a small dataset with images, keys."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ray import serve

from serve_app.app import AppArgs
from serve_app.ingress import ingress_deployment
from serve_app.reid.deployment import ReIDArgs, reid_deployment
from tests import factories
from tests.fixtures.private_services import PrivatePostgres, persistent_redis, private_postgres, private_redis
from tests.fixtures.ray_cluster import app_settings, wait_ready
from tests.helpers import auth, write_jpeg

__all__ = ["persistent_redis", "private_postgres", "private_redis"]  # fixtures re-exported for this directory

BBOX = {"x": 0.2, "y": 0.2, "w": 0.5, "h": 0.6}
GALLERY_REFRESH_S = 0.5
# A small model keeps identification fast on two cores; the features under test do not depend on it.
SMALL_REID: dict[str, Any] = {
    "architecture": "resnet18",
    "input_size_px": 64,
    "num_cpus": 0,
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.02,
    "gallery_refresh_s": GALLERY_REFRESH_S,
    "torch_threads": 1,
    "score_log": {"flush_rows": 200, "flush_interval_s": 0.2, "write_timeout_s": 3.0},
}


def small_app(settings: dict[str, Any], **reid: Any) -> serve.Application:
    """The whole application with a small ReID model; no replica reserves a CPU, so extra apps always fit."""
    args = AppArgs.model_validate({"settings": settings, "reid": {**SMALL_REID, **reid}})
    ingress = ingress_deployment(args.settings).options(
        num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0}
    )
    return ingress.bind(reid_deployment(ReIDArgs.model_validate(args.reid), args.settings))


@dataclass
class Deployed:
    """One extra Serve app: its URL, data root and settings."""

    name: str
    url: str
    root: Path
    settings: dict[str, Any]

    @property
    def images(self) -> Path:
        return self.root / "images"


@pytest.fixture
def deploy(serve_http_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Deployed]]:
    """Deploy an app for one test (deleted afterwards) against the given Postgres and Redis."""
    names: list[str] = []

    def _deploy(
        name: str, *, database_url: str, redis_url: str, reid: dict[str, Any] | None = None, **overrides: Any
    ) -> Deployed:
        root = tmp_path_factory.mktemp(f"app-{name}")
        (root / "images").mkdir()
        settings = app_settings(database_url, redis_url, root, **{"export_task_num_cpus": 0.01, **overrides})
        serve.run(small_app(settings, **(reid or {})), name=name, route_prefix=f"/{name}", blocking=False)
        names.append(name)
        url = f"http://127.0.0.1:{serve_http_port}/{name}"
        wait_ready(url, timeout_s=180)
        return Deployed(name, url, root, settings)

    yield _deploy
    for name in names:
        serve.delete(name)


@dataclass
class SiteData:
    """A site with a camera, K deer (one gallery crop each), an API key for this site only, and sightings."""

    id: int
    camera: int
    key: str
    deer: list[int] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    detections: list[int] = field(default_factory=list)
    captured: dict[str, str] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return auth(self.key)

    def body(self, uri: str) -> dict[str, Any]:
        # A recorded image must be named with its own camera and capture time (409 image-conflict otherwise).
        captured = self.captured.get(uri, "2024-05-01T06:30:00Z")
        return {"image_uri": uri, "camera_id": self.camera, "captured_at": captured, "bbox": BBOX}


def make_site(conn: psycopg.Connection[Any], images: Path, *, k: int = 3, days: int = 5) -> SiteData:
    """Insert a site whose deer each have a gallery crop on disk, plus a review-band detection per day."""
    sid = factories.site(conn)
    cam = factories.camera(conn, site_id=sid)
    data = SiteData(sid, cam, factories.api_key(conn, sites=[sid]))
    now = dt.datetime.now(dt.UTC)
    for i in range(k):
        uri = write_jpeg(images, f"gallery/{sid}-{i}.jpg", seed=1000 * sid + i)
        img = factories.image(
            conn, camera_id=cam, uri=uri, width=320, height=240, captured_at=now - dt.timedelta(days=i)
        )
        data.captured[uri] = (now - dt.timedelta(days=i)).isoformat()
        deer = factories.deer(conn, site_id=sid, name=f"deer-{sid}-{i}")
        factories.detection(conn, image_id=img, deer_id=deer, bbox=(BBOX["x"], BBOX["y"], BBOX["w"], BBOX["h"]))
        data.deer.append(deer)
        data.uris.append(uri)
    for day in range(days):
        img = factories.image(conn, camera_id=cam, captured_at=now - dt.timedelta(days=day, hours=1))
        data.detections.append(
            factories.detection(conn, image_id=img, decision="review", top1_similarity=0.5, bbox=(0.1, 0.1, 0.3, 0.3))
        )
    return data


@dataclass
class PgHandle:
    """The private Postgres and a dict-row connection to it."""

    server: PrivatePostgres
    conn: psycopg.Connection[Any]


@pytest.fixture
def private_db(private_postgres: PrivatePostgres) -> Iterator[PgHandle]:
    """The private Postgres, running and emptied (a previous test may have left it stopped)."""
    from serve_app.store.db import connect
    from tests.fixtures.postgres import truncate_all

    try:
        with psycopg.connect(private_postgres.url, connect_timeout=2):
            pass
    except psycopg.OperationalError:
        private_postgres.start()
    truncate_all(private_postgres.url)
    with connect(private_postgres.url, autocommit=True) as conn:
        yield PgHandle(private_postgres, conn)
