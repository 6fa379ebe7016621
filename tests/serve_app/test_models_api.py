"""GET /api/models and /api/models/{version} on the app the ingress builds, with a plain-Python stand-in for the
ReID deployment (the seam in serve_app/api/deps.py) and the registry filled by ``batch.models`` on real Postgres."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import psycopg

from batch.models import register
from serve_app.store.models import record_activation
from tests import factories
from tests.batch.model_cards import card_for, fake_weights, version_of
from tests.fixtures.ray_cluster import app_settings
from tests.helpers import auth


class RunningModel:
    """Answers readiness with the version it runs, as a ReID replica does."""

    def __init__(self, version: str) -> None:
        self.version = version

    async def identify(self, item: Any) -> Any:
        raise AssertionError("no identification here")

    async def ready(self) -> str:
        return self.version


def _get_all(app: Any, paths: list[str], headers: dict[str, str]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:
                return [await client.get(p, headers=headers) for p in paths]

    return asyncio.run(run())


def test_models_list_and_one_version_with_its_card_and_history(
    database_url: str, redis_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    from serve_app.ingress import create_app

    a = card_for(fake_weights(tmp_path, "a"), accept=0.7, review=0.55, top1=0.97)
    b = card_for(fake_weights(tmp_path, "b"), accept=0.77, top1=0.99, parent=version_of(a), samples=300)
    register(db, a, active=True, actor="make-run")
    register(db, b, actor="alice")
    record_activation(db, version=version_of(b), action="promote", actor="alice", accept_threshold=0.77,
                      review_threshold=0.62)  # fmt: skip
    site = factories.site(db)
    key = factories.api_key(db, sites=[site])  # a key for one site reads every model: models are not per site
    app = create_app(app_settings(database_url, redis_url, tmp_path), reid=RunningModel(version_of(b)))

    paths = ["/api/models", f"/api/models/{version_of(a)}", "/api/models/resnet18-nope-64"]
    listed, one, unknown = _get_all(app, paths, auth(key))
    (anonymous,) = _get_all(app, ["/api/models"], {})

    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["serving_version"] == version_of(b)
    assert [(m["version"], m["status"]) for m in body["items"]] == [
        (version_of(b), "active"),
        (version_of(a), "retired"),
    ]
    newest = body["items"][0]
    assert newest["architecture"] == "resnet18" and newest["input_size_px"] == 64
    assert newest["weights_sha256"].startswith(version_of(b).split("-")[1])
    assert newest["parent_version"] == version_of(a)
    assert newest["training"]["data"]["samples"] == 300 and newest["training"]["epochs"] == 2
    assert newest["validation"]["top1_known"] == 0.99
    assert newest["recommended_thresholds"] == {"accept": 0.77, "review": None}
    assert newest["created_at"].startswith("2026-05-01T06:30:00") and newest["promoted_at"] is not None

    assert one.status_code == 200, one.text
    detail = one.json()
    assert detail["status"] == "retired"
    assert detail["recommended_thresholds"] == {"accept": 0.7, "review": 0.55}
    assert detail["card"]["run"] == f"run-{detail['weights_sha256'][:6]}"
    assert "weights_path" not in detail["card"] and "weights_path" not in detail  # no server paths to a key
    assert [(h["action"], h["version"], h["previous_version"], h["actor"]) for h in detail["history"]] == [
        ("promote", version_of(a), None, "make-run"),
        ("promote", version_of(b), version_of(a), "alice"),
    ]

    assert unknown.status_code == 404
    assert unknown.headers["content-type"].startswith("application/problem+json")
    assert unknown.json()["code"] == "not-found"
    assert unknown.json()["detail"] == "no model version 'resnet18-nope-64' is registered"
    assert anonymous.status_code == 401


def test_models_list_says_no_version_serves_when_no_model_answers(
    database_url: str, redis_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    from serve_app.ingress import create_app

    key = factories.api_key(db)
    app = create_app(app_settings(database_url, redis_url, tmp_path))  # bare uvicorn's app: no model
    (listed,) = _get_all(app, ["/api/models"], auth(key))
    assert listed.status_code == 200
    assert listed.json() == {"items": [], "serving_version": None}
