"""Refused profile changes keep the status, code and detail clients branch on: a profile of another site is a
422 for an assignment and for a merge, and nothing changes; an accepted assignment is audited with its key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests import factories


async def _post_all(app: Any, requests: list[tuple[str, dict[str, Any]]], key: str) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {key}"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [await client.post(path, json=body, headers=headers) for path, body in requests]


def test_a_profile_of_another_site_is_refused_for_assignment_and_merge(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    from serve_app.ingress import create_app
    from tests.fixtures.ray_cluster import app_settings

    here, there = factories.site(db), factories.site(db)
    detection = factories.detection(
        db, image_id=factories.image(db, camera_id=factories.camera(db, site_id=here)), decision="review"
    )
    mine, theirs = factories.deer(db, site_id=here), factories.deer(db, site_id=there)
    key = factories.api_key(db)  # all sites: the refusals come from the profiles, not from the key
    app = create_app(app_settings(database_url, "redis://127.0.0.1:6379/0", tmp_path))
    wrong_site, across, right = asyncio.run(
        _post_all(
            app,
            [
                (f"/api/detections/{detection}/assignment", {"deer_id": theirs}),
                (f"/api/deer/{mine}/merge", {"into": theirs}),
                (f"/api/detections/{detection}/assignment", {"deer_id": mine, "note": "seen the antlers"}),
            ],
            key,
        )
    )

    assert (wrong_site.status_code, wrong_site.json()["code"]) == (422, "deer-not-in-site")
    assert wrong_site.json()["detail"] == "the deer profile does not exist at this detection's site"
    assert wrong_site.json()["type"].endswith("/deer-not-in-site")
    assert (across.status_code, across.json()["code"]) == (422, "merge-across-sites")
    assert across.json()["detail"] == "profiles of different sites cannot be merged"
    assert db.execute("SELECT merged_into FROM deer WHERE id = %s", (mine,)).fetchone()["merged_into"] is None
    assert right.status_code == 200
    assert right.json() == {"detection_id": detection, "deer_id": mine, "decision": "manual", "action": "assign"}
    events = db.execute(
        "SELECT site_id, action, to_deer_id, from_decision, to_decision, actor, note FROM review_events"
        " WHERE detection_id = %s",
        (detection,),
    ).fetchall()
    key_id = db.execute("SELECT max(id) AS id FROM api_keys").fetchone()["id"]
    assert [dict(e) for e in events] == [
        {
            "site_id": here,
            "action": "assign",
            "to_deer_id": mine,
            "from_decision": "review",
            "to_decision": "manual",
            "actor": f"api-key:{key_id}",
            "note": "seen the antlers",
        }
    ]
