"""Readiness over real Serve HTTP: ready with both services up, 503 naming Postgres when it is down."""

from __future__ import annotations

from pathlib import Path

import httpx
from ray import serve

from serve_app.app import build_app
from tests.fixtures.ray_cluster import app_settings, small_app_args, wait_ready


def test_healthz_and_readyz_answer_when_services_are_up(serve_url: str) -> None:
    assert httpx.get(serve_url + "/healthz").json() == {"status": "ok"}
    wait_ready(serve_url, timeout_s=60)  # a replica busy with earlier tests may answer a check late
    resp = httpx.get(serve_url + "/readyz", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["checks"] == {"redis": "ok", "postgres": "ok", "model": "ok"}


def test_openapi_docs_are_served(serve_url: str) -> None:
    assert httpx.get(serve_url + "/docs").status_code == 200
    spec = httpx.get(serve_url + "/openapi.json").json()
    assert "/readyz" in spec["paths"]


def test_readyz_names_postgres_when_it_is_down(
    serve_url: str, serve_http_port: int, redis_url: str, tmp_path: Path
) -> None:
    from tests.fixtures.ray_cluster import free_port

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    args = small_app_args(app_settings(dead, redis_url, tmp_path))
    serve.run(build_app(args), name="pg-down", route_prefix="/pgdown", blocking=False)
    try:
        url = f"http://127.0.0.1:{serve_http_port}/pgdown/readyz"
        resp = httpx.get(url, timeout=30)
        for _ in range(60):
            if resp.status_code != 404:
                break
            resp = httpx.get(url, timeout=30)
        assert resp.status_code == 503
        assert resp.headers["content-type"].startswith("application/problem+json")
        body = resp.json()
        assert body["services"] == ["postgres"]
        assert body["checks"] == {"redis": "ok", "postgres": "down", "model": "ok"}
        assert "postgres is down" in body["detail"]
    finally:
        serve.delete("pg-down")
