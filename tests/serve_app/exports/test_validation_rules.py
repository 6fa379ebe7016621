"""One 400 lists every failed rule (site and Idempotency-Key checks included); a mistake has one rule name
on every route (exports, detections JSON, batch and multipart)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from serve_app.exports.validation import validate_export_request
from serve_app.keys import Principal
from tests import factories
from tests.fixtures.ray_cluster import app_settings
from tests.helpers import export_body

TODAY = dt.datetime.now(dt.UTC).date()
PROBLEM = "application/problem+json"
MISSING_SITE = 987_654_321
ALL = Principal(key_id=1, all_sites=True)


async def _send(app: Any, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:
            return [await client.request(**r) for r in requests]


def send(settings: dict[str, Any], requests: list[dict[str, Any]]) -> list[httpx.Response]:
    from serve_app.ingress import create_app

    return asyncio.run(_send(create_app(settings), requests))


def rules_of(resp: httpx.Response) -> set[tuple[str, str]]:
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    return {(e["rule"], e["field"]) for e in resp.json()["errors"]}


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> dict[str, Any]:
    return app_settings(database_url, redis_url, tmp_path)


def test_unknown_sites_and_a_bad_idempotency_key_are_listed_with_every_other_failure(
    settings: dict[str, Any], db: psycopg.Connection[Any]
) -> None:
    key = factories.api_key(db)  # all sites: unknown ids are found by asking Postgres
    site = factories.site(db)
    headers = {"Authorization": f"Bearer {key}"}
    broken = export_body(
        start_date=str(TODAY), end_date=str(TODAY - dt.timedelta(days=3)), group_by="year", colour="red"
    )
    broken["site_ids"] = [site, MISSING_SITE]
    only_sites_and_header = export_body(days=10, site_ids=[MISSING_SITE])
    many, two = send(
        settings,
        [
            {"method": "POST", "url": "/api/exports", "json": broken, "headers": {**headers, "Idempotency-Key": ""}},
            {
                "method": "POST",
                "url": "/api/exports",
                "json": only_sites_and_header,
                "headers": {**headers, "Idempotency-Key": "k" * 300},
            },
        ],
    )
    assert rules_of(many) == {
        ("VR-001", "end_date"),
        ("VR-003", "group_by"),
        ("unknown_field", "colour"),
        ("site_access", "site_ids"),
        ("format", "Idempotency-Key"),
    }
    assert str(MISSING_SITE) in next(e["detail"] for e in many.json()["errors"] if e["rule"] == "site_access")
    assert rules_of(two) == {("site_access", "site_ids"), ("format", "Idempotency-Key")}


def test_the_validator_reports_unknown_sites_and_the_idempotency_key_with_the_rest() -> None:
    body = export_body(days=10, group_by="hour", site_ids=[1, 2])
    _, errors = validate_export_request(
        body, principal=ALL, today=TODAY, unknown_site_ids=[2], idempotency_key="x" * 256
    )
    assert {(e.rule, e.field) for e in errors} == {
        ("VR-003", "group_by"),
        ("site_access", "site_ids"),
        ("format", "Idempotency-Key"),
    }


def test_the_same_mistake_has_the_same_rule_name_on_every_route(
    settings: dict[str, Any], db: psycopg.Connection[Any]
) -> None:
    key = factories.api_key(db)
    headers = {"Authorization": f"Bearer {key}"}
    json_headers = {**headers, "Content-Type": "application/json"}
    detection = {
        "image_uri": "a.jpg",
        "camera_id": 1,
        "captured_at": "2024-05-01T06:30:00Z",
        "bbox": {"x": 0.1, "y": 0.1, "w": 0.2, "h": 0.2},
    }
    no_camera = {k: v for k, v in detection.items() if k != "camera_id"}
    form = {"camera_id": "1", "captured_at": "2024-05-01T06:30:00Z", "bbox": '{"x": 0.1, "y": 0.1, "w": 0.2, "h": 0.2}'}
    image = {"image": ("a.jpg", b"\xff\xd8not really a jpeg", "image/jpeg")}

    def post(url: str, **kw: Any) -> dict[str, Any]:
        return {"method": "POST", "url": url, "headers": kw.pop("headers", headers), **kw}

    cases: list[tuple[dict[str, Any], tuple[str, str]]] = [
        # An unknown field is unknown_field everywhere.
        (post("/api/exports", json=export_body(days=10, colour="red")), ("unknown_field", "colour")),
        (post("/api/detections", json={**detection, "colour": "red"}), ("unknown_field", "colour")),
        (
            post("/api/detections/batch", json={"detections": [{**detection, "colour": "red"}]}),
            ("unknown_field", "detections.0.colour"),
        ),
        (post("/api/detections", data={**form, "colour": "red"}, files=image), ("unknown_field", "colour")),
        # A missing field is missing_field everywhere.
        (
            post("/api/exports", json={k: v for k, v in export_body(days=10).items() if k != "format"}),
            ("missing_field", "format"),
        ),
        (post("/api/detections", json=no_camera), ("missing_field", "camera_id")),
        (post("/api/detections/batch", json={"detections": [no_camera]}), ("missing_field", "detections.0.camera_id")),
        (
            post("/api/detections", data={k: v for k, v in form.items() if k != "camera_id"}, files=image),
            ("missing_field", "camera_id"),
        ),
        (post("/api/detections", data=form, files={"other": ("x", b"x")}), ("missing_field", "image")),
        # A body that is not JSON is malformed_json everywhere.
        (post("/api/exports", content=b"{not json", headers=json_headers), ("malformed_json", "body")),
        (post("/api/detections", content=b"{not json", headers=json_headers), ("malformed_json", "body")),
        (post("/api/detections/batch", content=b"{not json", headers=json_headers), ("malformed_json", "body")),
        (post("/api/detections", data={**form, "bbox": "{not json"}, files=image), ("malformed_json", "bbox")),
    ]
    responses = send(settings, [request for request, _ in cases])
    for (request, expected), resp in zip(cases, responses, strict=True):
        assert expected in rules_of(resp), (request["url"], expected, resp.text)


def test_a_multipart_upload_lists_a_missing_image_together_with_its_other_failures(
    settings: dict[str, Any], db: psycopg.Connection[Any]
) -> None:
    key = factories.api_key(db)
    form = {"captured_at": "not a time", "bbox": "{not json"}
    (resp,) = send(
        settings,
        [
            {
                "method": "POST",
                "url": "/api/detections",
                "data": form,
                "files": {"other": ("x", b"x")},
                "headers": {"Authorization": f"Bearer {key}"},
            }
        ],
    )
    found = rules_of(resp)
    assert {("missing_field", "image"), ("malformed_json", "bbox"), ("missing_field", "camera_id")} <= found


def test_json_nested_deeper_than_the_parser_goes_is_malformed_json_not_a_500(
    settings: dict[str, Any], db: psycopg.Connection[Any]
) -> None:
    headers = {"Authorization": f"Bearer {factories.api_key(db)}", "Content-Type": "application/json"}
    deep = "[" * 100_000  # 100 kB: under the body limit, past Python's recursion limit
    form = {"camera_id": "1", "captured_at": "2024-05-01T06:30:00Z", "bbox": deep}
    image = {"image": ("a.jpg", b"\xff\xd8not really a jpeg", "image/jpeg")}
    answers = send(
        settings,
        [
            {"method": "POST", "url": "/api/exports", "content": deep, "headers": headers},
            {"method": "POST", "url": "/api/detections", "content": deep, "headers": headers},
            {"method": "POST", "url": "/api/detections/batch", "content": deep, "headers": headers},
            {
                "method": "POST",
                "url": "/api/detections",
                "data": form,
                "files": image,
                "headers": {"Authorization": headers["Authorization"]},
            },
        ],
    )
    for resp in answers:
        assert ("malformed_json", "body" if "bbox" not in resp.text else "bbox") in rules_of(resp), resp.text
