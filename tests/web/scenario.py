"""Data for the web UI tests: a site with profiles (each pictured by a manual detection) and detections waiting
for review with scored candidates, a second site, and keys for each; plus signing in through the form."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI

from tests import factories
from tests.helpers import write_jpeg

MODEL = "resnet18-0123456789ab-64"
Scenario = Callable[[httpx.AsyncClient], Coroutine[Any, Any, None]]
ACCEPT = 0.75


@dataclass(frozen=True)
class ReviewScenario:
    """What the UI tests look at."""

    site: int
    camera: int
    other_site: int
    key: str
    other_key: str
    deer: list[int]
    deer_names: list[str]
    queue: list[int]
    """Review-band detections, closest to the accept threshold first."""
    other_detection: int


def _scores(db: psycopg.Connection[Any], detection: int, ranked: list[tuple[int, float]]) -> None:
    for rank, (deer_id, similarity) in enumerate(ranked, start=1):
        db.execute(
            "INSERT INTO reid_similarity_scores (detection_id, deer_id, similarity, rank, threshold, matched,"
            " model_version, source) VALUES (%s, %s, %s, %s, %s, false, %s, 'online')",
            (detection, deer_id, similarity, rank, ACCEPT, MODEL),
        )


def review_scenario(db: psycopg.Connection[Any], image_root: Path, *, items: int = 4) -> ReviewScenario:
    """``items`` review-band detections at one site, each scored against three named profiles."""
    site, other = factories.site(db), factories.site(db)
    camera, other_camera = factories.camera(db, site_id=site), factories.camera(db, site_id=other)
    names = [f"Doe {c}" for c in "ABC"]
    deer = [factories.deer(db, site_id=site, name=n) for n in names]
    for i, deer_id in enumerate(deer):
        uri = write_jpeg(image_root, f"ui/{site}/gallery-{i}.jpg", seed=100 + i)
        factories.detection(db, image_id=factories.image(db, camera_id=camera, uri=uri), deer_id=deer_id)
    queue: list[tuple[float, int]] = []
    now = dt.datetime.now(dt.UTC)
    for i in range(items):
        uri = write_jpeg(image_root, f"ui/{site}/item-{i}.jpg", seed=200 + i)
        image = factories.image(db, camera_id=camera, uri=uri, captured_at=now - dt.timedelta(hours=10 - i))
        top = 0.70 - 0.05 * i  # the first is closest to the threshold
        detection = factories.detection(db, image_id=image, decision="review", top1_similarity=top)
        db.execute("UPDATE detections SET model_version = %s WHERE id = %s", (MODEL, detection))
        _scores(db, detection, [(deer[(i + j) % 3], top - 0.1 * j) for j in range(3)])
        queue.append((abs(top - ACCEPT), detection))
    uri = write_jpeg(image_root, f"ui/{other}/item.jpg", seed=300)
    other_detection = factories.detection(
        db, image_id=factories.image(db, camera_id=other_camera, uri=uri), decision="review", top1_similarity=0.6
    )
    return ReviewScenario(
        site=site,
        camera=camera,
        other_site=other,
        key=factories.api_key(db, sites=[site]),
        other_key=factories.api_key(db, sites=[other]),
        deer=deer,
        deer_names=names,
        queue=[d for _, d in sorted(queue)],
        other_detection=other_detection,
    )


@asynccontextmanager
async def app_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` inside its lifespan (started as a server starts it, shut down on the way out), and an httpx
    client on it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:
            yield client


@asynccontextmanager
async def ui_client(settings: dict[str, Any], *, export_queue: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app the ingress builds (no Ray: ``export_queue`` stands in for the Ray one), inside its lifespan,
    and an httpx client on it."""
    from serve_app.ingress import create_app

    async with app_client(create_app(settings, export_queue=export_queue)) as client:
        yield client


def runner(settings: dict[str, Any], *, export_queue: Any) -> Callable[[Scenario], None]:
    """Runs a scenario (an async function of the client) against a fresh app of ``settings``."""

    def go(body: Scenario) -> None:
        async def main() -> None:
            async with ui_client(settings, export_queue=export_queue) as client:
                await body(client)

        asyncio.run(main())

    return go


def hidden(html: str, name: str) -> str:
    """The value of a page's hidden input ``name``."""
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden {name} in the page"
    return match.group(1)


async def sign_in(client: httpx.AsyncClient, key: str) -> str:
    """Sign in through the form; the session cookie stays in the client. Returns the session's CSRF token."""
    form = await client.get("/ui/login")
    assert form.status_code == 200
    done = await client.post(
        "/ui/login", data={"api_key": key, "login_token": hidden(form.text, "login_token"), "next": "/ui/review"}
    )
    assert done.status_code == 303, done.text
    page = await client.get("/ui/review")
    assert page.status_code == 200, page.text
    return hidden(page.text, "csrf")
