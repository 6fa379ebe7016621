"""GET /api/reid/thresholds/history on the app the ingress builds (real Postgres and Redis, no Ray): newest first,
a page at a time, for any valid key, problem+json for bad parameters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from serve_app.store.reports import store_report
from serve_app.store.threshold_history import ThresholdChange, record_change
from tests import factories
from tests.fixtures.ray_cluster import app_settings
from tests.helpers import auth

URL = "/api/reid/thresholds/history"


class NoExports:
    """The export queue seam: this file sends no exports."""

    async def submit(self, job_id: str, *, params: dict[str, Any]) -> None:
        raise AssertionError("no export expected")

    async def cancel(self, job_id: str) -> None:
        raise AssertionError("no export expected")


@asynccontextmanager
async def client_for(settings: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    from serve_app.ingress import create_app

    app = create_app(settings, export_queue=NoExports())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:
            yield client


@pytest.fixture
def run(
    database_url: str, redis_url: str, tmp_path: Path
) -> Callable[[Callable[[httpx.AsyncClient], Coroutine[Any, Any, None]]], None]:
    settings = app_settings(database_url, redis_url, tmp_path)

    def scenario(body: Callable[[httpx.AsyncClient], Coroutine[Any, Any, None]]) -> None:
        async def go() -> None:
            async with client_for(settings) as client:
                await body(client)

        asyncio.run(go())

    return scenario


def changes(db: psycopg.Connection[Any], n: int) -> list[int]:
    report = store_report(db, model_version="resnet18-0123456789ab-64", sites=None, report={"recommended": 0.7})
    return [
        record_change(
            db,
            ThresholdChange(
                f"person-{i}", "resnet18-0123456789ab-64", 0.55, None, 0.6 + i / 100, 0.5, report, {"precision": 0.96}
            ),
        )
        for i in range(n)
    ]


def test_changes_are_listed_newest_first_a_page_at_a_time(db: psycopg.Connection[Any], run: Any) -> None:
    ids = changes(db, 5)
    site = factories.site(db)
    key = factories.api_key(db, sites=[site])  # a key for one site reads the app-wide history too...
    every_site = factories.api_key(db)

    async def body(client: httpx.AsyncClient) -> None:
        first = await client.get(URL, params={"limit": 2}, headers=auth(key))
        assert first.status_code == 200, first.text
        items = first.json()["items"]
        assert [i["id"] for i in items] == ids[::-1][:2]
        newest = items[0]
        assert newest["actor"] == "person-4" and newest["model_version"] == "resnet18-0123456789ab-64"
        assert newest["from"] == {"accept_threshold": 0.55, "review_threshold": None}
        assert newest["to"] == {"accept_threshold": 0.64, "review_threshold": 0.5}
        assert newest["at"].endswith("+00:00")
        # ...but not the all-sites figures behind each change, which a key for every site reads.
        assert newest["evidence"] is None and newest["report_id"] is None
        full = (await client.get(URL, params={"limit": 1}, headers=auth(every_site))).json()["items"][0]
        assert full["evidence"] == {"precision": 0.96} and full["report_id"] is not None
        rest = await client.get(URL, params={"limit": 2, "offset": 2}, headers=auth(key))
        after = await client.get(URL, params={"limit": 2, "offset": 4}, headers=auth(key))
        assert [i["id"] for i in rest.json()["items"] + after.json()["items"]] == ids[::-1][2:]
        beyond = await client.get(URL, params={"offset": 5}, headers=auth(key))
        assert beyond.status_code == 200 and beyond.json() == {"items": []}

    run(body)


@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"limit": "ten"}, "limit"), ({"offset": -1}, "offset"),
     ({"offset": 10**30}, "offset")],
)  # fmt: skip
def test_bad_paging_parameters_answer_400_problem_json(
    db: psycopg.Connection[Any], run: Any, params: dict[str, Any], field: str
) -> None:
    key = factories.api_key(db)

    async def body(client: httpx.AsyncClient) -> None:
        resp = await client.get(URL, params=params, headers=auth(key))
        assert resp.status_code == 400, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert [e["field"] for e in resp.json()["errors"]] == [field]

    run(body)


def test_the_history_needs_a_key(db: psycopg.Connection[Any], run: Any) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        assert (await client.get(URL)).status_code == 401
        assert (await client.get(URL, headers=auth("not-a-key"))).status_code == 401

    run(body)


def test_the_route_is_documented_under_reid() -> None:
    from serve_app.ingress import create_app

    spec = create_app().openapi()
    operation = spec["paths"][URL]["get"]
    assert operation["tags"] == ["reid"]
    assert {p["name"] for p in operation["parameters"]} == {"limit", "offset"}
    reid = next(t for t in spec["tags"] if t["name"] == "reid")
    assert URL in reid["description"]
