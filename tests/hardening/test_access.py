"""Access: a key sees only its sites (404, never 403, so ids do not leak); no key is 401 on every /api
route; keys are compared in constant time and never logged; the dashboard and metrics bind to loopback."""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests import factories
from tests.hardening.conftest import SiteData, make_site
from tests.helpers import export_body, wait_final
from tests.waiting import sessions_waiting_on_locks

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "application/problem+json"
MISSING_ID = 987_654_321


def assert_404(resp: httpx.Response) -> None:
    assert resp.status_code == 404, f"{resp.request.method} {resp.request.url}: {resp.status_code} {resp.text}"
    assert resp.headers["content-type"].startswith(PROBLEM)
    assert resp.json()["code"] == "not-found"


@dataclass
class TwoSites:
    a: SiteData
    b: SiteData
    b_export: str


@pytest.fixture
def two_sites(serve_url: str, db: psycopg.Connection[Any], tmp_path: Path) -> TwoSites:
    a = make_site(db, tmp_path / "images", k=2)
    b = make_site(db, tmp_path / "images", k=2)
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        resp = client.post("/api/exports", json=export_body("csv"), headers=b.headers())
        assert resp.status_code == 202, resp.text
        wait_final(client, resp.headers["location"], b.headers(), unavailable_ok=True)
    return TwoSites(a, b, resp.json()["id"])


def test_a_key_for_site_a_gets_404_for_everything_of_site_b(
    serve_url: str, two_sites: TwoSites, db: psycopg.Connection[Any]
) -> None:
    a, b = two_sites.a, two_sites.b
    key = a.headers()
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        # Deer: a profile of B reads exactly like one that does not exist.
        assert_404(client.get(f"/api/deer/{b.deer[0]}", headers=key))
        assert_404(client.get(f"/api/deer/{MISSING_ID}", headers=key))
        assert_404(client.post(f"/api/deer/{b.deer[0]}/merge", json={"into": b.deer[1]}, headers=key))
        assert_404(client.patch(f"/api/deer/{b.deer[0]}", json={"name": "renamed"}, headers=key))
        assert_404(client.patch(f"/api/deer/{MISSING_ID}", json={"name": "renamed"}, headers=key))
        assert_404(client.post(f"/api/deer/{a.deer[0]}/merge", json={"into": b.deer[0]}, headers=key))
        listed = client.get("/api/deer", headers=key).json()["items"]
        assert {d["id"] for d in listed} == set(a.deer)
        assert client.get("/api/deer", params={"site_id": b.id}, headers=key).json()["items"] == []
        # Review items and assignments.
        queue = client.get("/api/review", headers=key).json()["items"]
        assert {i["detection_id"] for i in queue} == set(a.detections)
        body = {"deer_id": b.deer[0]}
        assert_404(client.post(f"/api/detections/{b.detections[0]}/assignment", json=body, headers=key))
        assert_404(client.post(f"/api/detections/{MISSING_ID}/assignment", json=body, headers=key))
        # Identification against B's camera: refused before any image is read or model runs.
        assert_404(client.post("/api/detections", json=b.body(b.uris[0]), headers=key))
        batch = {"detections": [b.body(b.uris[0]), a.body(a.uris[0])]}
        assert_404(client.post("/api/detections/batch", json=batch, headers=key))
        # Exports: B's job cannot be read, downloaded or deleted; B's site cannot be exported.
        assert_404(client.get(f"/api/exports/{two_sites.b_export}", headers=key))
        assert_404(client.get(f"/api/exports/{two_sites.b_export}/download", headers=key))
        assert_404(client.delete(f"/api/exports/{two_sites.b_export}", headers=key))
        refused = client.post("/api/exports", json=export_body("csv", site_ids=[b.id]), headers=key)
        assert refused.status_code == 400 and refused.json()["errors"][0]["field"] == "site_ids", refused.text
        # B's key still sees all of it, unchanged.
        assert client.get(f"/api/exports/{two_sites.b_export}", headers=b.headers()).json()["status"] == "completed"
        assert client.get(f"/api/deer/{b.deer[0]}", headers=b.headers()).status_code == 200
    row = db.execute("SELECT decision, deer_id FROM detections WHERE id = %s", (b.detections[0],)).fetchone()
    assert row == {"decision": "review", "deer_id": None}
    merged = db.execute("SELECT count(*) AS n FROM deer WHERE merged_into IS NOT NULL").fetchone()
    assert merged == {"n": 0}
    assert db.execute("SELECT count(*) AS n FROM deer WHERE name = 'renamed'").fetchone() == {"n": 0}


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_api_route_answers_401_without_a_valid_key(serve_url: str, db: psycopg.Connection[Any]) -> None:
    revoked = factories.api_key(db)
    db.execute("UPDATE api_keys SET revoked_at = now()")
    spec = httpx.get(serve_url + "/openapi.json", timeout=30).json()
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if p.startswith("/api/")]
    assert len(routes) >= 9, routes
    headers_cases: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer tcr_not-a-key"},
        {"Authorization": f"Bearer {revoked}"},
    ]
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        for method, path in routes:
            for headers in headers_cases:
                resp = client.request(method, _concrete(path), headers=headers, content=b"{not json")
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.headers["content-type"].startswith(PROBLEM)
                assert resp.headers["www-authenticate"] == "Bearer"


def test_keys_are_found_by_prefix_and_their_digests_compared_in_constant_time(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token sharing a stored key's prefix is refused by comparing the two digests (hmac.compare_digest),
    not by a lookup on the presented digest that never compares anything."""
    from serve_app import keys
    from serve_app.ingress import create_app
    from serve_app.keys import hash_key
    from tests.fixtures.ray_cluster import app_settings

    key = factories.api_key(db)
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")  # same prefix, another key
    compared: list[tuple[bytes, bytes]] = []
    real = keys.hmac.compare_digest

    def spy(x: bytes, y: bytes) -> bool:
        compared.append((x, y))
        return bool(real(x, y))

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    app = create_app(app_settings(database_url, "redis://127.0.0.1:6379/0", tmp_path))
    statuses = asyncio.run(_get_all(app, "/api/deer", [{"Authorization": f"Bearer {t}"} for t in (key, forged)]))
    assert statuses == [200, 401]
    stored = hash_key(key, pepper=factories.TEST_PEPPER).encode()
    presented = hash_key(forged, pepper=factories.TEST_PEPPER).encode()
    assert (stored, stored) in compared  # the valid key: stored and presented digests compared
    assert (stored, presented) in compared  # the forged one was compared with the stored digest and lost


def test_tokens_that_cannot_be_keys_are_refused_without_waiting_for_postgres(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """Malformed tokens, and a token refused a moment ago, answer 401 while the key table is locked."""
    from serve_app.ingress import create_app
    from tests.fixtures.ray_cluster import app_settings

    factories.api_key(db)
    refused = "tcr_" + "Z" * 43  # well-formed, not a key
    malformed = ["tcr_not-a-key", "x" * 47, "tcr_" + "A" * 42 + "!", "tcr_" + "A" * 500]
    app = create_app(app_settings(database_url, "redis://127.0.0.1:6379/0", tmp_path))

    async def run() -> tuple[int, list[int]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=10) as client:
                first = (await client.get("/api/deer", headers={"Authorization": f"Bearer {refused}"})).status_code
                with psycopg.connect(database_url) as locker:  # any key query now waits behind this lock
                    locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
                    tokens = [refused] * 20 + malformed * 5
                    calls = (client.get("/api/deer", headers={"Authorization": f"Bearer {t}"}) for t in tokens)
                    # ASGITransport has no timeouts: a deadline, so a lookup stuck on the lock fails the test.
                    answers = await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
                    locker.rollback()
                return first, [a.status_code for a in answers]

    first, statuses = asyncio.run(run())
    assert first == 401
    assert statuses == [401] * 40


def test_a_flood_of_invalid_tokens_does_not_delay_valid_keys(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """300 random well-formed tokens and 20 valid-key requests at once, against a slow Postgres (every answer
    0.25 s late, 8 pooled connections): each invalid one gets 401, each valid one 200, none 503, and the
    invalid tokens cost a bounded number of key queries instead of one pooled connection each."""
    import secrets

    from serve_app.ingress import create_app
    from serve_app.store.db import with_database
    from tests.fixtures.ray_cluster import app_settings, free_port
    from tests.hardening.latency_proxy import LatencyProxy

    key = factories.api_key(db)
    proxy = LatencyProxy(free_port(), delay_s=0.25)
    slow_url = with_database(f"postgresql://postgres@127.0.0.1:{proxy.port}/x", database_url.rsplit("/", 1)[1])
    app = create_app(app_settings(slow_url, "redis://127.0.0.1:6379/0", tmp_path, db_pool_max=8))

    async def flood() -> tuple[list[int], list[int], int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as client:

                def get(token: str) -> Any:
                    return asyncio.ensure_future(client.get("/api/deer", headers={"Authorization": f"Bearer {token}"}))

                invalid = [get("tcr_" + secrets.token_urlsafe(32)) for _ in range(300)]
                valid = [get(key) for _ in range(20)]  # sent after the flood: behind it in any queue
                bad = [r.status_code for r in await asyncio.gather(*invalid)]
                good = [r.status_code for r in await asyncio.gather(*valid)]
                return bad, good, app.state.resources.keys.queries

    try:
        bad, good, queries = asyncio.run(flood())
    finally:
        proxy.close()
    assert good == [200] * 20, sorted(set(good))
    assert bad == [401] * 300, sorted(set(bad))
    assert queries <= 10, f"{queries} key queries for 320 requests"


def test_a_burst_with_an_uncached_key_waits_for_one_lookup(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """30 concurrent requests with a key not in the cache run one key query, not one per pooled connection."""
    from serve_app.ingress import create_app
    from tests.fixtures.ray_cluster import app_settings

    key = factories.api_key(db)
    app = create_app(app_settings(database_url, "redis://127.0.0.1:6379/0", tmp_path, db_pool_max=4))

    async def burst() -> tuple[int, list[int], int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:
                with psycopg.connect(database_url) as locker:  # key lookups wait behind this lock
                    locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
                    requests = [
                        asyncio.ensure_future(
                            client.get("/api/exports/no-such-job", headers={"Authorization": f"Bearer {key}"})
                        )
                        for _ in range(30)
                    ]
                    keys = app.state.resources.keys
                    deadline = time.monotonic() + 30
                    # Every request has reached the key check and the lookup waits behind the lock.
                    while not (keys.waiting == 30 and sessions_waiting_on_locks(db) >= 1):
                        assert time.monotonic() < deadline, (keys.waiting, sessions_waiting_on_locks(db))
                        await asyncio.sleep(0.05)
                    blocked = sessions_waiting_on_locks(db)
                    locker.rollback()
                statuses = [r.status_code for r in await asyncio.gather(*requests)]
                return blocked, statuses, keys.queries

    blocked, statuses, queries = asyncio.run(burst())
    assert blocked == 1, f"key lookups waiting in Postgres: {blocked}"
    assert statuses == [404] * 30  # every request was authenticated
    assert queries == 1  # by the one lookup


async def _get_all(app: Any, path: str, headers: list[dict[str, str]]) -> list[int]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [(await client.get(path, headers=h)).status_code for h in headers]


async def _requests_with_key(app: Any, key: str) -> None:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for headers in ({"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {key}x"}):
                await client.get("/api/deer", headers=headers)
                await client.get(f"/api/deer/{MISSING_ID}", headers=headers)
                await client.post("/api/exports", json={"start_date": "nope"}, headers=headers)
                await client.get("/api/exports/unknown", headers=headers)
                await client.post("/api/detections", json={"image_uri": "../../etc/passwd"}, headers=headers)


def test_keys_never_appear_in_logs(
    serve_url: str,
    database_url: str,
    db: psycopg.Connection[Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import ray

    from serve_app.ingress import create_app
    from tests.fixtures.ray_cluster import app_settings

    key = factories.api_key(db)
    secret = key.removeprefix("tcr_")
    caplog.set_level(logging.DEBUG)
    app = create_app(app_settings(database_url, "redis://127.0.0.1:1/0", tmp_path))  # Redis down: warnings too
    asyncio.run(_requests_with_key(app, key))
    assert caplog.records, "nothing was logged, so the check proves nothing"
    assert secret not in caplog.text
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"

    def log_files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in logs.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", "")}

    def refusals_logged() -> int:  # access-log lines of the export GET with the bad key (proxy and replica)
        return sum(text.count(b"GET /api/exports/{job_id} 401") for text in log_files().values())

    before = refusals_logged()
    # The same requests through Serve: replica, proxy and access logs of this Ray session.
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        for headers in ({"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {key}x"}):
            client.get("/api/deer", headers=headers)
            client.get(f"/api/deer/{MISSING_ID}", headers=headers)
            client.get("/api/exports/unknown", headers=headers)
    # Log files are written asynchronously: wait until the proxy and the replica have logged the requests.
    deadline = time.monotonic() + 60
    while refusals_logged() < before + 2:
        assert time.monotonic() < deadline, "the requests never reached the Serve logs"
        time.sleep(0.2)
    scanned = log_files()
    for path, text in scanned.items():
        assert secret.encode() not in text, f"the key appears in {path}"
    assert scanned


def _ray_start_flags(script: str) -> dict[str, str]:
    text = script.replace("\\\n", " ")
    line = next(line for line in text.splitlines() if re.search(r'"\$RAY" start|ray start', line))
    words = shlex.split(line)
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


def test_dashboard_metrics_and_http_bind_to_loopback_by_default() -> None:
    flags = _ray_start_flags((ROOT / "cluster/local/up.sh").read_text())
    assert flags.get("--dashboard-host") == "127.0.0.1"
    # Ray's metrics agent binds to loopback when the node's IP is loopback (reporter_agent).
    assert flags.get("--node-ip-address") == "127.0.0.1"
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    start = (ROOT / "cluster/monitoring/start.sh").read_text()
    assert '--web.listen-address="127.0.0.1:' in start and "GF_SERVER_HTTP_ADDR=127.0.0.1" in start
