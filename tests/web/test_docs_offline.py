"""The API docs (/docs, /redoc) render in a real headless chromium from the app's own vendored assets, with no
request to another host and no Content-Security-Policy violation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, expect

from serve_app.web.security import CONTENT_SECURITY_POLICY
from tests.fixtures.browser import BrowserLog, screenshot

ROOT = Path(__file__).resolve().parents[2]
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
KNOWN_SUMMARY = "Identify one detection"
URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|(https?://[^\s"'<>]+)""", re.IGNORECASE)


def published_operations(base_url: str) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in the app's /openapi.json."""
    spec: dict[str, Any] = httpx.get(base_url + "/openapi.json", timeout=30).raise_for_status().json()
    return {(method.upper(), path) for path, item in spec["paths"].items() for method in item if method in HTTP_METHODS}


def test_swagger_ui_lists_every_operation_without_leaving_the_app(
    live_app: str, page: Page, browser_log: BrowserLog
) -> None:
    expected = published_operations(live_app)
    response = page.goto(live_app + "/docs")
    assert response is not None and response.ok
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-frame-options"] == "DENY"

    operations = page.locator("#swagger-ui .opblock")
    expect(operations).to_have_count(len(expected))
    expect(page.locator(".opblock-summary-description", has_text=KNOWN_SUMMARY)).to_be_visible()
    shown = {
        (block.locator(".opblock-summary-method").inner_text().strip(), path)
        for block in operations.all()
        if (path := block.locator(".opblock-summary-path").get_attribute("data-path")) is not None
    }
    assert shown == expected

    page.wait_for_load_state("networkidle")  # anything the UI loads after rendering has been asked for
    screenshot(page, "docs")
    assert browser_log.errors == []
    assert browser_log.outside_requests == []


def test_redoc_renders_operations_and_searches_without_leaving_the_app(
    live_app: str, page: Page, browser_log: BrowserLog
) -> None:
    response = page.goto(live_app + "/redoc")
    assert response is not None and response.ok
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY

    expect(page.get_by_role("heading", name=KNOWN_SUMMARY)).to_be_visible()
    # Search runs in ReDoc's Web Worker (a blob: URL the policy allows as worker-src).
    page.get_by_placeholder("Search...").fill("Identify")
    expect(page.locator("[data-role='search:results']").get_by_text(KNOWN_SUMMARY)).to_be_visible()

    page.wait_for_load_state("networkidle")
    assert browser_log.errors == []
    assert browser_log.outside_requests == []


def test_docs_pages_reference_only_the_apps_own_assets(live_app: str) -> None:
    for page_path in ("/docs", "/redoc"):
        html = httpx.get(live_app + page_path, timeout=30).raise_for_status().text
        assert "<script>" not in html, f"{page_path} has an inline script"
        referenced = [local or absolute for local, absolute in URL.findall(html)]
        assert referenced, f"{page_path} references nothing"
        outside = [url for url in referenced if not url.startswith("/")]
        assert outside == [], f"{page_path} references URLs outside the app"
        for url in referenced:
            asset = httpx.get(live_app + url, timeout=30)
            assert asset.status_code == 200, f"{page_path} references {url}, which answers {asset.status_code}"
