"""The review queue and exports pages, sign-in, sign-out, CSRF and site access on the app the ingress builds
(real Postgres and Redis, exports by the real runner in a thread; no Ray, no browser: tests/web/test_browser.py
drives the same pages in Chromium on Serve)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from serve_app.config import Settings
from tests import factories
from tests.fixtures.ray_cluster import app_settings
from tests.helpers import ThreadQueue, auth
from tests.waiting import wait_until_async
from tests.web.scenario import ReviewScenario, Scenario, app_client, hidden, review_scenario, runner, sign_in


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> dict[str, Any]:
    return app_settings(database_url, redis_url, tmp_path)


@pytest.fixture
def scenario(db: psycopg.Connection[Any], tmp_path: Path) -> ReviewScenario:
    return review_scenario(db, tmp_path / "images")


@pytest.fixture
def run(settings: dict[str, Any]) -> Callable[[Scenario], None]:
    return runner(settings, export_queue=ThreadQueue(Settings(**settings)))


def test_pages_need_a_sign_in_and_a_valid_key(scenario: ReviewScenario, run: Callable[[Scenario], None]) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        page = await client.get("/ui/review?site_id=1")
        assert page.status_code == 303 and page.headers["location"] == "/ui/login?next=%2Fui%2Freview%3Fsite_id%3D1"
        form = await client.get("/ui/login")
        assert (
            "content-security-policy" in form.headers and "script-src 'self'" in form.headers["content-security-policy"]
        )
        wrong = await client.post(
            "/ui/login", data={"api_key": "tc_" + "x" * 43, "login_token": hidden(form.text, "login_token")}
        )
        assert (
            wrong.status_code == 401
            and "not valid" in wrong.text
            and "trailcam_ui=" not in wrong.headers.get("set-cookie", "")
        )
        forged = await client.post("/ui/login", data={"api_key": scenario.key, "login_token": "1.forged"})
        assert forged.status_code == 403
        done = await client.post(
            "/ui/login",
            data={
                "api_key": scenario.key,
                "login_token": hidden(form.text, "login_token"),
                "next": "https://evil.example/",
            },
        )
        assert done.status_code == 303 and done.headers["location"] == "/ui/review"
        cookie = done.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert scenario.key not in done.headers["set-cookie"]
        page = await client.get("/ui/review")
        assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
        csrf = hidden(page.text, "csrf")
        # Sign-out needs the form's token; then the cookie no longer opens anything, even if replayed.
        cookie_value = client.cookies.get("trailcam_ui")
        assert (await client.post("/ui/logout", data={})).status_code == 403
        out = await client.post("/ui/logout", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
        client.cookies.set("trailcam_ui", str(cookie_value))
        assert (await client.get("/ui/review")).status_code == 303

    run(body)


def test_the_pages_session_store_and_api_client_are_made_at_start_and_the_client_closed_at_shutdown(
    scenario: ReviewScenario, settings: dict[str, Any]
) -> None:
    from serve_app.ingress import create_app

    app = create_app(settings, export_queue=ThreadQueue(Settings(**settings)))

    async def main() -> None:
        async with app_client(app) as client:
            store, api = app.state.ui_sessions, app.state.ui_api_client  # there before any request
            assert not api.is_closed
            await sign_in(client, scenario.key)
            first = await asyncio.gather(*(client.get("/ui/review") for _ in range(4)))  # at once
            assert [page.status_code for page in first] == [200] * 4
            assert all(f"Detection {scenario.queue[0]}" in page.text for page in first)
            assert app.state.ui_sessions is store and app.state.ui_api_client is api
        assert api.is_closed

    asyncio.run(main())


def test_review_queue_shows_the_most_informative_item_and_records_decisions(
    scenario: ReviewScenario, db: psycopg.Connection[Any], run: Callable[[Scenario], None]
) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        csrf = await sign_in(client, scenario.key)
        page = await client.get("/ui/review")
        first = scenario.queue[0]
        assert f"Detection {first}" in page.text and "<strong>4</strong> detections left" in page.text
        for name in scenario.deer_names:
            assert name in page.text
        crop = await client.get(f"/ui/crops/{first}")
        assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
        cached = await client.get(f"/ui/crops/{first}", headers={"if-none-match": crop.headers["etag"]})
        assert cached.status_code == 304
        # A decision without the form's token changes nothing.
        refused = await client.post(f"/ui/review/{first}", data={"action": f"accept:{scenario.deer[0]}"})
        assert refused.status_code == 403
        assert db.execute("SELECT decision FROM detections WHERE id = %s", (first,)).fetchone() == {
            "decision": "review"
        }
        done = await client.post(
            f"/ui/review/{first}",
            data={"csrf": csrf, "action": f"accept:{scenario.deer[0]}", "note": "left ear notch", "pos": "0"},
        )
        assert done.status_code == 303
        page = await client.get(done.headers["location"])
        assert (
            f"Decision saved for detection {first}" in page.text and "<strong>3</strong> detections left" in page.text
        )
        assert f"Detection {scenario.queue[1]}" in page.text
        new = await client.post(
            f"/ui/review/{scenario.queue[1]}", data={"csrf": csrf, "action": "new", "new_name": "Buck 7", "pos": "0"}
        )
        assert new.status_code == 303
        none = await client.post(f"/ui/review/{scenario.queue[2]}", data={"csrf": csrf, "action": "unassign"})
        assert none.status_code == 303
        events = db.execute(
            "SELECT detection_id, action, note FROM review_events WHERE detection_id = ANY(%s) ORDER BY id",
            (scenario.queue[:3],),
        ).fetchall()
        assert [(e["detection_id"], e["action"], e["note"]) for e in events] == [
            (scenario.queue[0], "assign", "left ear notch"),
            (scenario.queue[1], "new_deer", None),
            (scenario.queue[2], "unassign", None),
        ]
        seen = (await client.get(f"/api/detections/{scenario.queue[0]}", headers=auth(scenario.key))).json()
        assert seen["decision"] == "manual" and seen["deer_id"] == scenario.deer[0]
        assert [(e["action"], e["note"]) for e in seen["review_events"]] == [("assign", "left ear notch")]
        detail = await client.get(f"/ui/review/{scenario.queue[0]}")
        assert detail.status_code == 200 and "left ear notch" in detail.text and "manual" in detail.text
        missing_name = await client.post(f"/ui/review/{scenario.queue[3]}", data={"csrf": csrf, "action": "new"})
        assert missing_name.status_code == 422 and "name" in missing_name.text

    run(body)


def test_review_filters_and_bad_filters(scenario: ReviewScenario, run: Callable[[Scenario], None]) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        await sign_in(client, scenario.key)
        band = await client.get("/ui/review", params={"min_similarity": "0.62", "max_similarity": "0.72"})
        assert "<strong>2</strong> detections left" in band.text
        oldest = await client.get("/ui/review", params={"order": "oldest", "camera_id": str(scenario.camera)})
        assert f"Detection {scenario.queue[0]}" in oldest.text  # the oldest is also the closest here
        today = dt.datetime.now(dt.UTC).date()
        future = await client.get("/ui/review", params={"since": str(today + dt.timedelta(days=2))})
        assert "<strong>0</strong> detections left" in future.text and "Nothing waits for review" in future.text
        bad = await client.get("/ui/review", params={"min_similarity": "high"})
        assert bad.status_code == 422 and "min_similarity" in bad.text
        skip = await client.get("/ui/review", params={"pos": "1"})
        assert f"Detection {scenario.queue[1]}" in skip.text and "showing 2 of 4" in skip.text

    run(body)


def test_another_sites_detection_is_not_found(scenario: ReviewScenario, run: Callable[[Scenario], None]) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        csrf = await sign_in(client, scenario.key)
        assert (await client.get(f"/ui/crops/{scenario.other_detection}")).status_code == 404
        assert (await client.get(f"/ui/review/{scenario.other_detection}")).status_code == 404
        api = await client.get(f"/api/detections/{scenario.other_detection}", headers=auth(scenario.key))
        assert api.status_code == 404 and api.headers["content-type"] == "application/problem+json"
        decide = await client.post(f"/ui/review/{scenario.other_detection}", data={"csrf": csrf, "action": "unassign"})
        assert decide.status_code == 404 and "not found" in decide.text.lower()
        page = await client.get("/ui/review")
        assert f"Detection {scenario.other_detection}" not in page.text
        assert (await client.get(f"/ui/review?site_id={scenario.other_site}")).text.count("Detection ") == 0

    run(body)


def test_exports_form_shows_rules_beside_fields_and_jobs_until_they_end(
    scenario: ReviewScenario, run: Callable[[Scenario], None]
) -> None:
    today = dt.datetime.now(dt.UTC).date()

    async def body(client: httpx.AsyncClient) -> None:
        csrf = await sign_in(client, scenario.key)
        backwards = {"csrf": csrf, "start_date": str(today), "end_date": str(today - dt.timedelta(days=3)),
                     "group_by": "week", "format": "csv"}  # fmt: skip
        refused = await client.post("/ui/exports", data=backwards)
        assert refused.status_code == 400
        assert 'id="err-end_date">VR-001' in refused.text and "No exports requested" in refused.text
        assert (await client.post("/ui/exports", data={**backwards, "csrf": ""})).status_code == 403
        valid = {**backwards, "start_date": str(today - dt.timedelta(days=7)), "end_date": str(today)}
        created = await client.post("/ui/exports", data=valid)
        assert created.status_code == 303
        job_id = created.headers["location"].split("created=")[1]

        async def completed() -> str | None:
            fragment = await client.get("/ui/exports/jobs")
            return fragment.text if 'data-status="completed"' in fragment.text else None

        fragment = await wait_until_async(completed, timeout_s=60, what="the export completed on the page")
        assert 'data-polling="no"' in fragment and "hx-trigger" not in fragment  # polling stops at the end
        file = await client.get(f"/ui/exports/{job_id}/download")
        assert file.status_code == 200 and file.headers["content-type"].startswith("text/csv")
        assert file.content.startswith(b"period") or b"," in file.content.splitlines()[0]
        api = await client.get(f"/api/exports/{job_id}", headers=auth(scenario.key))
        assert api.json()["status"] == "completed"
        gone = await client.post(f"/ui/exports/{job_id}/cancel", data={"csrf": csrf})
        assert gone.status_code == 303
        assert (await client.get(f"/api/exports/{job_id}", headers=auth(scenario.key))).status_code == 404

    run(body)


def ui_routes(app: Any) -> list[tuple[str, str]]:
    """(METHOD, path) of every /ui route the app serves."""
    out: list[tuple[str, str]] = []
    for route in app.router.routes:
        contexts = route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]
        for context in contexts:
            path = getattr(context, "path", "")
            if path.startswith("/ui"):
                out.extend((method, path) for method in sorted(getattr(context, "methods", ()) or ()))
    return out


def test_every_ui_route_needs_a_session_and_hides_another_sites_ids(
    scenario: ReviewScenario, settings: dict[str, Any], db: psycopg.Connection[Any]
) -> None:
    from serve_app.ingress import create_app

    routes = ui_routes(create_app(settings))
    assert len(routes) >= 18, routes
    other_deer = db.execute("SELECT id FROM deer WHERE site_id = %s LIMIT 1", (scenario.other_site,)).fetchone()
    if other_deer is None:
        other_deer = {"id": factories.deer(db, site_id=scenario.other_site, name="Stranger")}
    ids = {"detection_id": scenario.other_detection, "deer_id": other_deer["id"], "job_id": "0" * 32,
           "report_id": 987654321}  # fmt: skip
    public = {("GET", "/ui/login"), ("POST", "/ui/login"), ("GET", "/ui")}

    async def body(client: httpx.AsyncClient) -> None:
        for method, path in routes:
            if (method, path) in public:
                continue
            url = path.format(**ids)
            anonymous = await client.request(method, url, data={"csrf": "x"} if method == "POST" else None)
            assert anonymous.status_code == 303, (method, path, anonymous.status_code)
            assert anonymous.headers["location"].startswith("/ui/login"), (method, path)
        csrf = await sign_in(client, scenario.key)
        for method, path in routes:
            if "{" not in path:
                continue
            url = path.format(**ids)
            form = {"csrf": csrf, "into": "1", "name": "x", "action": "unassign"}
            answer = await client.request(
                method, url, data=form if method == "POST" else None, params={"into": 1} if method == "GET" else None
            )
            assert answer.status_code == 404, (method, path, answer.status_code, answer.text[:300])
        row = db.execute("SELECT name, merged_into FROM deer WHERE id = %s", (other_deer["id"],)).fetchone()
        assert row is not None and row["merged_into"] is None and row["name"] != "x"

    runner(settings, export_queue=ThreadQueue(Settings(**settings)))(body)


def test_odd_input_is_a_clear_refusal_never_a_500(scenario: ReviewScenario, run: Callable[[Scenario], None]) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        form = await client.get("/ui/login")
        token = hidden(form.text, "login_token")
        # Non-ASCII in every token a browser sends back.
        assert (await client.post("/ui/login", data={"api_key": "k", "login_token": "123.é"})).status_code == 403
        odd_cookie = {"cookie": "trailcam_ui=abc.é".encode()}
        assert (await client.get("/ui/review", headers=odd_cookie)).status_code == 303
        # The sign-in token is bound to this browser's sign-in cookie: another browser cannot use it.
        async with httpx.AsyncClient(transport=client._transport, base_url="http://app") as other:
            stolen = await other.post("/ui/login", data={"api_key": scenario.key, "login_token": token})
            assert stolen.status_code == 403 and "trailcam_ui=" not in stolen.headers.get("set-cookie", "")
        # A form another site sends is refused even with the right tokens.
        cross = await client.post(
            "/ui/login", data={"api_key": scenario.key, "login_token": token}, headers={"Sec-Fetch-Site": "cross-site"}
        )
        assert cross.status_code == 403
        csrf = await sign_in(client, scenario.key)
        assert (await client.post("/ui/logout", data={"csrf": "é"})).status_code == 403
        assert (await client.post("/ui/logout", headers={"X-CSRF-Token": "é".encode()})).status_code == 403
        elsewhere = await client.post(
            f"/ui/review/{scenario.queue[0]}",
            data={"csrf": csrf, "action": "unassign"},
            headers={"Origin": "https://evil.example"},
        )
        assert elsewhere.status_code == 403
        for url in ("/ui/review?pos=²", "/ui/deer?offset=²", "/ui/review?until=9999-12-31", "/ui/review?since=x"):
            answer = await client.get(url)
            assert answer.status_code < 500, (url, answer.status_code)
        merge = await client.get(f"/ui/deer/{scenario.deer[0]}/merge", params={"into": "²"})
        assert merge.status_code == 400
        accept = await client.post(f"/ui/review/{scenario.queue[0]}", data={"csrf": csrf, "action": "accept:²"})
        assert accept.status_code == 422

    run(body)
