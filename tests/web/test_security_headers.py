"""Security headers: on every answer outside /api/ (pages, static files, errors), never on /api/ answers, and
never in place of a policy a route sets itself."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serve_app.web.security import CONTENT_SECURITY_POLICY, SECURITY_HEADERS, SecurityHeaders

PAGE_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}


def get_all(app: Any, paths: list[str]) -> dict[str, httpx.Response]:
    async def go() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return {path: await client.get(path) for path in paths}

    return asyncio.run(go())


def test_pages_static_files_and_errors_outside_the_api_carry_the_headers_api_answers_do_not() -> None:
    from serve_app.ingress import create_app

    answers = get_all(create_app(), ["/docs", "/redoc", "/static/docs/docs.css", "/static/missing.js", "/api/deer"])
    for path in ("/docs", "/redoc", "/static/docs/docs.css", "/static/missing.js"):
        assert {name: answers[path].headers.get(name) for name in PAGE_HEADERS} == PAGE_HEADERS, path
    assert answers["/static/missing.js"].status_code == 404
    api = answers["/api/deer"]
    assert api.status_code == 401
    assert not any(name in api.headers for name in PAGE_HEADERS)


def test_a_policy_the_route_sets_is_kept() -> None:
    stricter = "default-src 'none'"

    async def own_policy(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok", headers={"Content-Security-Policy": stricter})

    app = SecurityHeaders(Starlette(routes=[Route("/page", own_policy)]))
    headers = get_all(app, ["/page"])["/page"].headers
    assert headers.get_list("content-security-policy") == [stricter]
    assert headers["x-frame-options"] == SECURITY_HEADERS["X-Frame-Options"]
