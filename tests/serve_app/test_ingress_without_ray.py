"""The app built by the ingress with plain-Python stand-ins for the model and the export queue (the seams in
serve_app/api/deps.py): the routes, the store and the export runner answer as on Serve, and Ray never starts."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import ray
from PIL import Image

from serve_app.config import Settings
from serve_app.reid.identification import Identification, IdentifyRequest
from serve_app.reid.preprocessing import BBox, crop_box_px
from tests import factories
from tests.fixtures.ray_cluster import app_settings
from tests.helpers import ThreadQueue
from tests.waiting import wait_until_async

TODAY = dt.datetime.now(dt.UTC).date()


class StandInModel:
    """Answers every crop as a new deer and keeps what it was sent; not ready until ``loaded``."""

    def __init__(self) -> None:
        self.seen: list[IdentifyRequest] = []
        self.loaded = False

    async def identify(self, item: IdentifyRequest) -> Identification:
        self.seen.append(item)
        return Identification(
            detection_id=1000 + len(self.seen),
            model_version="stand-in",
            decision="new",
            deer_id=None,
            top1_similarity=None,
        )

    async def ready(self) -> str:
        if not self.loaded:
            raise RuntimeError("model still loading")
        return "stand-in"


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> dict[str, Any]:
    return app_settings(database_url, redis_url, tmp_path)


@asynccontextmanager
async def client_for(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:
            yield client


def test_an_export_runs_downloads_and_deletes_through_a_plain_python_queue(
    settings: dict[str, Any], db: psycopg.Connection[Any]
) -> None:
    from serve_app.ingress import create_app

    site = factories.site(db)
    camera = factories.camera(db, site_id=site)
    for days_ago in (1, 2, 3):
        when = dt.datetime.combine(TODAY - dt.timedelta(days=days_ago), dt.time(12), tzinfo=dt.UTC)
        factories.detection(db, image_id=factories.image(db, camera_id=camera, captured_at=when))
    headers = {"Authorization": f"Bearer {factories.api_key(db, sites=[site])}"}
    body = {
        "start_date": str(TODAY - dt.timedelta(days=10)),
        "end_date": str(TODAY),
        "group_by": "month",
        "format": "csv",
    }
    queue = ThreadQueue(Settings(**settings))
    app = create_app(settings, export_queue=queue)

    async def scenario() -> None:
        async with client_for(app) as client:
            created = await client.post("/api/exports", json=body, headers=headers)
            assert created.status_code == 202, created.text
            url = created.headers["location"]

            async def final() -> dict[str, Any] | None:
                resp = await client.get(url, headers=headers)
                assert resp.status_code == 200, resp.text
                job: dict[str, Any] = resp.json()
                return job if job["status"] != "processing" else None

            job = await wait_until_async(final, what="the export to finish", timeout_s=60)
            assert job["status"] == "completed", job
            download = await client.get(job["download_url"], headers=headers)
            assert download.status_code == 200
            rows = list(csv.DictReader(io.StringIO(download.text)))
            assert sum(int(r["detections"]) for r in rows) == 3
            assert {int(r["camera_id"]) for r in rows} == {camera}

            deleted = await client.delete(url, headers=headers)
            assert deleted.status_code == 204
            assert queue.cancelled == [job["id"]]
            assert (await client.get(url, headers=headers)).status_code == 404

    ray_before = ray.is_initialized()  # other tests of the session may have started Ray; this one must not
    asyncio.run(scenario())
    assert ray.is_initialized() == ray_before


def test_detections_reach_the_injected_model_cropped_and_readiness_waits_for_it(
    settings: dict[str, Any], db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    from serve_app.ingress import create_app

    site = factories.site(db)
    camera = factories.camera(db, site_id=site)
    headers = {"Authorization": f"Bearer {factories.api_key(db, sites=[site])}"}
    image = tmp_path / "images" / "cam" / "frame.jpg"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (400, 200), (90, 120, 60)).save(image)
    detection = {
        "image_uri": "cam/frame.jpg",
        "camera_id": camera,
        "captured_at": "2026-01-02T03:04:05Z",
        "bbox": {"x": 0.25, "y": 0.5, "w": 0.5, "h": 0.25},
    }
    model = StandInModel()
    app = create_app(settings, reid=model, export_queue=ThreadQueue(Settings(**settings)))

    async def scenario() -> None:
        async with client_for(app) as client:
            loading = await client.get("/readyz")
            assert loading.status_code == 503 and loading.json()["checks"]["model"] == "down"
            model.loaded = True
            assert (await client.get("/readyz")).json()["checks"]["model"] == "ok"

            answered = await client.post("/api/detections", json=detection, headers=headers)
            assert answered.status_code == 201, answered.text
            assert answered.json() == {
                "detection_id": 1001,
                "model_version": "stand-in",
                "decision": "new",
                "deer_id": None,
                "candidates": [],
            }
            (sent,) = model.seen
            assert (sent.site_id, sent.camera_id, sent.image_uri) == (site, camera, "cam/frame.jpg")
            left, top, right, bottom = crop_box_px((400, 200), BBox(0.25, 0.5, 0.5, 0.25))
            assert (sent.width, sent.height, sent.crop.size) == (400, 200, (right - left, bottom - top))

    ray_before = ray.is_initialized()  # other tests of the session may have started Ray; this one must not
    asyncio.run(scenario())
    assert ray.is_initialized() == ray_before


def test_an_app_without_a_model_answers_model_unavailable_after_validating(
    settings: dict[str, Any], db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    from serve_app.ingress import create_app

    site = factories.site(db)
    camera = factories.camera(db, site_id=site)
    headers = {"Authorization": f"Bearer {factories.api_key(db, sites=[site])}"}
    image = tmp_path / "images" / "frame.jpg"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(image)
    good = {"image_uri": "frame.jpg", "camera_id": camera, "captured_at": "2026-01-02T03:04:05Z"}
    app = create_app(settings, export_queue=ThreadQueue(Settings(**settings)))  # no model: bare uvicorn's app

    async def scenario() -> None:
        async with client_for(app) as client:
            bad_bbox = {**good, "bbox": {"x": 0.9, "y": 0.9, "w": 0.5, "h": 0.5}}
            refused = await client.post("/api/detections", json=bad_bbox, headers=headers)
            assert refused.status_code == 400, refused.text
            bbox = {"x": 0.1, "y": 0.1, "w": 0.5, "h": 0.5}
            unavailable = await client.post("/api/detections", json={**good, "bbox": bbox}, headers=headers)
            assert unavailable.status_code == 503, unavailable.text
            assert unavailable.json()["code"] == "model-unavailable"
            assert "model" not in (await client.get("/readyz")).json()["checks"]

    ray_before = ray.is_initialized()  # other tests of the session may have started Ray; this one must not
    asyncio.run(scenario())
    assert ray.is_initialized() == ray_before
