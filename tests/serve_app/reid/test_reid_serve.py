"""Identification over real HTTP on Ray Serve (small resnet18 at 64 px, random seeded weights), real Postgres.

Random weights carry no identity information, so every case here avoids learned features: a crop
byte-identical to a gallery crop, the same crop sent twice, counts of logged rows, thresholds at the
extremes, and refusals that happen before the model.
"""

from __future__ import annotations

import datetime as dt
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from PIL import Image
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from tests import factories
from tests.fixtures.ray_cluster import app_settings, free_port, wait_ready
from tests.helpers import auth, write_jpeg
from tests.serve_app.reid.pgproxy import PgProxy
from tests.waiting import wait_until

APP = "reid"
CAPTURED = dt.datetime(2024, 5, 1, 6, 30, tzinfo=dt.UTC)  # the gallery images' time, which body() sends
BBOX = {"x": 0.2, "y": 0.2, "w": 0.5, "h": 0.6}
MAX_BUFFERED = 40
REFRESH_S = 0.5


def app_config(settings: dict[str, Any], *, user_config: dict[str, Any] | None = None) -> ServeDeploySchema:
    app: dict[str, Any] = {
        "name": APP,
        "route_prefix": "/" + APP,
        "import_path": "serve_app.app:build_app",
        "args": {
            "settings": settings,
            "reid": {
                "architecture": "resnet18",
                "input_size_px": 64,
                "num_cpus": 0.5,
                "max_batch_size": 8,
                "batch_wait_timeout_s": 0.02,
                "gallery_refresh_s": REFRESH_S,
                "score_log": {
                    "max_buffered_rows": MAX_BUFFERED,
                    "flush_rows": 50,
                    "flush_interval_s": 0.1,
                    "write_timeout_s": 3.0,
                },
            },
        },
    }
    if user_config is not None:
        app["deployments"] = [{"name": "ReID", "user_config": user_config}]
    return ServeDeploySchema.model_validate({"applications": [app]})


class Env:
    def __init__(self, url: str, root: Path, proxy: PgProxy, settings: dict[str, Any]) -> None:
        self.url, self.root, self.proxy, self.settings = url, root, proxy, settings

    def describe(self) -> dict[str, Any]:
        return serve.get_deployment_handle("ReID", app_name=APP).describe.remote().result(timeout_s=30)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        _get_global_client().deploy_apps(app_config(self.settings, user_config=user_config))
        wait_until(
            lambda: self.describe()["accept_threshold"] == user_config["accept_threshold"],
            what="user_config applied",
            timeout_s=60,
            every_s=0.2,
        )


@pytest.fixture(scope="module")
def env(
    serve_http_port: int, database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("reid")
    (root / "images").mkdir()
    proxy = PgProxy(free_port())
    score_dsn = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert score_dsn != database_url
    settings = app_settings(
        database_url,
        redis_url,
        root,
        score_database_url=score_dsn,
        max_upload_bytes=200_000,
        max_image_pixels=20_000_000,
    )
    _get_global_client().deploy_apps(app_config(settings, user_config={"accept_threshold": 0.55}))
    url = f"http://127.0.0.1:{serve_http_port}/{APP}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            break
        time.sleep(0.5)
    wait_ready(url)
    yield Env(url, root / "images", proxy, settings)
    serve.delete(APP)
    proxy.close()


class Site:
    # The replica caches galleries by site id, and every test empties the tables and restarts their ids: each
    # Site takes an id no earlier test of this module used, so no replica holds a gallery for it yet.
    last_id = 0

    def __init__(self, db: psycopg.Connection[Any], env: Env, *, k: int) -> None:
        db.execute(
            "SELECT setval(pg_get_serial_sequence('sites', 'id'),"
            " greatest(%s, (SELECT coalesce(max(id), 0) FROM sites)) + 1, false)",
            (Site.last_id,),
        )
        self.id = Site.last_id = factories.site(db)
        self.camera = factories.camera(db, site_id=self.id)
        self.key = factories.api_key(db, sites=[self.id])
        self.deer: list[int] = []
        self.uris: list[str] = []
        for i in range(k):
            uri = write_jpeg(env.root, f"gallery/{self.id}-{i}.jpg", seed=1000 * self.id + i)
            image = factories.image(db, camera_id=self.camera, uri=uri, width=320, height=240, captured_at=CAPTURED)
            deer = factories.deer(db, site_id=self.id, name=f"deer-{i}")
            factories.detection(db, image_id=image, deer_id=deer, bbox=(BBOX["x"], BBOX["y"], BBOX["w"], BBOX["h"]))
            self.deer.append(deer)
            self.uris.append(uri)

    def headers(self) -> dict[str, str]:
        return auth(self.key)

    def body(self, uri: str) -> dict[str, Any]:
        return {"image_uri": uri, "camera_id": self.camera, "captured_at": "2024-05-01T06:30:00Z", "bbox": BBOX}


def post(env: Env, site: Site, uri: str) -> httpx.Response:
    return httpx.post(env.url + "/api/detections", json=site.body(uri), headers=site.headers(), timeout=60)


def wait_rows(db: psycopg.Connection[Any], ids: list[int], expected: int, timeout_s: float = 20) -> int:
    deadline = time.monotonic() + timeout_s
    n = -1
    while time.monotonic() < deadline:
        n = db.execute(
            "SELECT count(*) AS n FROM reid_similarity_scores WHERE detection_id = ANY(%s)", (ids,)
        ).fetchone()["n"]
        if n >= expected:
            return int(n)
        time.sleep(0.2)
    return int(n)


def test_byte_identical_crop_is_auto_assigned_to_its_deer(env: Env, db: psycopg.Connection[Any]) -> None:
    """The gallery crop itself (same file, same bbox) must come back as its own deer with similarity ~1."""
    site = Site(db, env, k=3)
    resp = post(env, site, site.uris[1])
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["decision"] == "auto" and body["deer_id"] == site.deer[1]
    assert body["candidates"][0]["deer_id"] == site.deer[1] and body["candidates"][0]["similarity"] >= 0.999
    assert body["model_version"] == "resnet18-random-seed7-64"
    assert [c["similarity"] for c in body["candidates"]] == sorted(
        (c["similarity"] for c in body["candidates"]), reverse=True
    )
    stored = db.execute(
        "SELECT deer_id, decision, model_version, embedding IS NOT NULL AS emb FROM detections WHERE id = %s",
        (body["detection_id"],),
    ).fetchone()
    assert stored == {"deer_id": site.deer[1], "decision": "auto", "model_version": body["model_version"], "emb": True}


def test_same_crop_twice_scores_its_first_assignment_above_0_999(env: Env, db: psycopg.Connection[Any]) -> None:
    """A new crop is assigned (automatically or by a reviewer); once the replica's gallery refresh (every REFRESH_S)
    has seen the assignment, the same crop matches that deer at ~1."""
    site = Site(db, env, k=2)
    uri = write_jpeg(env.root, f"new/{site.id}.jpg", seed=77)
    first = post(env, site, uri).json()
    deer = first["deer_id"]
    if first["decision"] != "auto":
        deer = site.deer[0]
        r = httpx.post(
            f"{env.url}/api/detections/{first['detection_id']}/assignment",
            json={"deer_id": deer, "note": "checked"},
            headers=site.headers(),
        )
        assert r.status_code == 200, r.text

    def matches_its_assignment() -> dict[str, Any] | None:
        again = post(env, site, uri).json()
        sims = {c["deer_id"]: c["similarity"] for c in again["candidates"]}
        return again if sims.get(deer, 0.0) >= 0.999 else None

    # Each try is one more identification; without a refresh of the gallery none ever matches.
    second = wait_until(matches_its_assignment, what="the assigned crop in the gallery", every_s=REFRESH_S / 2)
    assert second["decision"] == "auto" and second["deer_id"] == deer


def test_every_similarity_is_logged_with_rank_threshold_and_match(env: Env, db: psycopg.Connection[Any]) -> None:
    site = Site(db, env, k=3)
    uris = [*site.uris, *(write_jpeg(env.root, f"log/{site.id}-{i}.jpg", seed=500 + i) for i in range(3))]
    resp = httpx.post(
        env.url + "/api/detections/batch",
        json={"detections": [site.body(u) for u in uris]},
        headers=site.headers(),
        timeout=60,
    )
    assert resp.status_code == 201, resp.text
    items = resp.json()["items"]
    ids = [i["detection_id"] for i in items]
    assert wait_rows(db, ids, 6 * 3) == 6 * 3, env.describe()["scores"]
    rows = db.execute(
        "SELECT detection_id, deer_id, rank, threshold, matched, source FROM reid_similarity_scores"
        " WHERE detection_id = ANY(%s) ORDER BY detection_id, rank",
        (ids,),
    ).fetchall()
    by_det = {i["detection_id"]: i for i in items}
    for det_id in ids:
        mine = [r for r in rows if r["detection_id"] == det_id]
        assert [r["rank"] for r in mine] == [1, 2, 3]
        assert {r["deer_id"] for r in mine} == set(site.deer)
        assert all(abs(r["threshold"] - 0.55) < 1e-6 and r["source"] == "online" for r in mine)
        item = by_det[det_id]
        assert [r["matched"] for r in mine] == [item["decision"] == "auto", False, False]
        if item["decision"] == "auto":
            assert mine[0]["deer_id"] == item["deer_id"]


def test_threshold_change_applies_without_restarting_replicas(env: Env, db: psycopg.Connection[Any]) -> None:
    """accept=1.0 with a review band down to -1: a non-identical crop goes to review; then back to 0.55."""
    site = Site(db, env, k=2)
    before = env.describe()
    env.reconfigure({"accept_threshold": 1.0, "review_threshold": -1.0})
    try:
        uri = write_jpeg(env.root, f"thr/{site.id}.jpg", seed=4242)
        body = post(env, site, uri).json()
        assert body["decision"] == "review" and body["deer_id"] is None
        after = env.describe()
        assert after["pid"] == before["pid"] and after["accept_threshold"] == 1.0
        queue = httpx.get(env.url + "/api/review", headers=site.headers()).json()["items"]
        assert wait_rows(db, [body["detection_id"]], 2) == 2
        queue = httpx.get(env.url + "/api/review", headers=site.headers()).json()["items"]
        assert [q["detection_id"] for q in queue] == [body["detection_id"]]
        assert len(queue[0]["candidates"]) == 2
        thr = db.execute(
            "SELECT DISTINCT threshold FROM reid_similarity_scores WHERE detection_id = %s", (body["detection_id"],)
        ).fetchall()
        assert thr == [{"threshold": 1.0}]
    finally:
        env.reconfigure({"accept_threshold": 0.55})
    assert env.describe()["pid"] == before["pid"]


def test_score_log_outage_never_fails_identification_and_counts_drops(env: Env, db: psycopg.Connection[Any]) -> None:
    """Score-log connection cut: identifications answer 201, rows buffer up to the bound, the rest are counted."""
    site = Site(db, env, k=3)
    before = env.describe()["scores"]
    env.proxy.cut()
    ids = []
    try:
        for i in range(20):
            resp = post(env, site, site.uris[i % 3])
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["detection_id"])
        during = env.describe()["scores"]
        assert during["pending"] == MAX_BUFFERED
        assert during["dropped"] - before["dropped"] == 20 * 3 - MAX_BUFFERED
        full = during["dropped_by_reason"].get("buffer_full", 0) - before["dropped_by_reason"].get("buffer_full", 0)
        assert full == 20 * 3 - MAX_BUFFERED
    finally:
        env.proxy.restore()
    assert wait_rows(db, ids, MAX_BUFFERED, timeout_s=30) == MAX_BUFFERED
    after = env.describe()["scores"]
    assert after["pending"] == 0 and after["written"] - before["written"] == MAX_BUFFERED


def test_terminated_connections_mid_run_keep_answering_and_rows_land(env: Env, db: psycopg.Connection[Any]) -> None:
    site = Site(db, env, k=2)
    ids = []
    for i in range(6):
        if i == 3:
            db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
        resp = post(env, site, site.uris[i % 2])
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["detection_id"])
    assert wait_rows(db, ids, 12, timeout_s=30) == 12


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")
    return buf.getvalue()


def test_unsafe_inputs_get_problem_json_and_never_reach_the_model(
    env: Env, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    site = Site(db, env, k=1)
    outside = write_jpeg(tmp_path, "outside.jpg", seed=3)
    (env.root / "escape.jpg").symlink_to(tmp_path / outside)
    good = site.uris[0]
    jpeg = (env.root / good).read_bytes()
    before = env.describe()["identified"]
    detections_before = db.execute("SELECT count(*) AS n FROM detections").fetchone()["n"]
    form = {
        "camera_id": str(site.camera),
        "captured_at": "2024-05-01T06:30:00Z",
        "bbox": '{"x":0.1,"y":0.1,"w":0.5,"h":0.5}',
    }
    cases: list[tuple[str, httpx.Response, int, str]] = []
    for name, uri, status, code in [
        ("traversal", "../../etc/passwd", 400, "image-uri-outside-root"),
        ("symlink", "escape.jpg", 400, "image-uri-outside-root"),
        ("absolute outside", str(tmp_path / outside), 400, "image-uri-outside-root"),
        ("remote", "http://example.com/a.jpg", 400, "image-uri-scheme"),
        ("file url", "file:///etc/passwd", 400, "image-uri-scheme"),
    ]:
        cases.append((name, post(env, site, uri), status, code))
    url = env.url + "/api/detections"
    h = site.headers()
    cases.append(
        (
            "oversized",
            httpx.post(url, data=form, files={"image": ("a.jpg", b"\xff" * 300_000, "image/jpeg")}, headers=h),
            413,
            "upload-too-large",
        )
    )
    cases.append(
        (
            "corrupt",
            httpx.post(url, data=form, files={"image": ("a.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}, headers=h),
            422,
            "corrupt-image",
        )
    )
    cases.append(
        (
            "bomb",
            httpx.post(url, data=form, files={"image": ("a.png", _bomb_png(), "image/png")}, headers=h),
            413,
            "decompression-bomb",
        )
    )
    for name, resp, status, code in cases:
        assert resp.status_code == status, (name, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json"), name
        assert resp.json()["code"] == code, (name, resp.json())
    assert env.describe()["identified"] == before
    assert db.execute("SELECT count(*) AS n FROM detections").fetchone()["n"] == detections_before
    ok = httpx.post(url, data=form, files={"image": ("a.jpg", jpeg, "image/jpeg")}, headers=h, timeout=60)
    assert ok.status_code == 201, ok.text


def test_a_key_reaches_only_cameras_of_its_sites(env: Env, db: psycopg.Connection[Any]) -> None:
    mine, other = Site(db, env, k=1), Site(db, env, k=1)
    resp = httpx.post(env.url + "/api/detections", json=other.body(other.uris[0]), headers=mine.headers())
    assert resp.status_code == 404 and resp.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(f"{env.url}/api/deer/{other.deer[0]}", headers=mine.headers()).status_code == 404


def test_deer_profiles_and_merge_are_audited(env: Env, db: psycopg.Connection[Any]) -> None:
    site = Site(db, env, k=2)
    listed = httpx.get(env.url + "/api/deer", headers=site.headers()).json()["items"]
    assert [d["id"] for d in listed] == site.deer and all(d["sightings"] == 1 for d in listed)
    r = httpx.post(f"{env.url}/api/deer/{site.deer[0]}/merge", json={"into": site.deer[1]}, headers=site.headers())
    assert r.status_code == 200 and r.json()["detections_moved"] == 1
    profile = httpx.get(f"{env.url}/api/deer/{site.deer[1]}", headers=site.headers()).json()
    assert len(profile["recent_sightings"]) == 2
    assert [d["id"] for d in httpx.get(env.url + "/api/deer", headers=site.headers()).json()["items"]] == [site.deer[1]]
    event = db.execute("SELECT action, from_deer_id, to_deer_id, api_key_id FROM review_events").fetchone()
    assert event["action"] == "merge" and (event["from_deer_id"], event["to_deer_id"]) == (site.deer[0], site.deer[1])


def test_a_profile_is_edited_field_by_field_and_a_merged_one_is_read_only(
    env: Env, db: psycopg.Connection[Any]
) -> None:
    site = Site(db, env, k=2)
    url, h = f"{env.url}/api/deer/{site.deer[0]}", site.headers()
    r = httpx.patch(url, json={"name": "  Split Ear  ", "sex": "male", "notes": "left ear notched"}, headers=h)
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["sex"], r.json()["notes"]) == ("Split Ear", "male", "left ear notched")
    r = httpx.patch(url, json={"notes": None}, headers=h)  # only what the body names changes
    assert (r.json()["name"], r.json()["sex"], r.json()["notes"]) == ("Split Ear", "male", None)
    assert httpx.get(url, headers=h).json()["name"] == "Split Ear"
    for body, code in (
        ({}, "empty-patch"),
        ({"name": None}, "name-required"),
        ({"name": "   "}, None),
        ({"sex": "buck"}, None),
        ({"deer_id": 3}, None),
    ):
        bad = httpx.patch(url, json=body, headers=h)
        assert bad.status_code in (400, 422), (body, bad.text)
        assert bad.headers["content-type"].startswith("application/problem+json"), body
        if code:
            assert bad.json()["code"] == code, bad.json()
    assert db.execute("SELECT name, sex FROM deer WHERE id = %s", (site.deer[0],)).fetchone() == {
        "name": "Split Ear",
        "sex": "male",
    }
    httpx.post(url + "/merge", json={"into": site.deer[1]}, headers=h).raise_for_status()
    merged = httpx.patch(url, json={"name": "ghost"}, headers=h)
    assert merged.status_code == 409 and merged.json()["code"] == "deer-merged"


def test_readyz_reports_the_model(env: Env) -> None:
    resp = httpx.get(env.url + "/readyz")
    assert resp.status_code == 200 and resp.json()["checks"]["model"] == "ok"
