"""Serving over a head and two worker nodes: ReID replicas on both, one node lost under a steady load.

The application is deployed the way a cluster runs it, with ``serve deploy`` through the head's dashboard: the
HTTP proxy and the ingress on the head (``proxy_location: HeadOnly``; a proxy per node would need a port per
node on one host), the ReID replicas on the worker group (label ``trailcam/group=cpu``), where Serve spreads
them over both nodes. While clients identify detections without pause, the raylet of a node holding a ReID
replica is SIGKILLed: answers stay 201 or 503 problem+json (never a 500), Serve starts a replacement on the
surviving node, identifications flow again, and every answered detection has its score rows exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from cluster.local.ray_workers import WORKER_LABELS, free_port
from tests.fixtures.multinode import LocalRayCluster, Node
from tests.fixtures.ray_cluster import app_entry, app_settings, small_app_args, wait_ready
from tests.hardening.conftest import SiteData, make_site
from tests.hardening.test_faults import check_identifications, wait_score_rows
from tests.helpers import export_body, score_duplicates, wait_final
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
APP = "trailcam"
REID_REPLICA = f"ServeReplica:{APP}:ReID"
INGRESS_REPLICA = f"ServeReplica:{APP}:Ingress"
WORKER_CPUS = 2
"""Per worker node: room for both ReID replicas (0.5 CPU each) once the other node is gone."""
CLIENTS = 4
ANSWERS_BEFORE = 30
"""Identifications answered before the node is lost (the load is steady by then)."""
ANSWERS_AFTER = 30
"""Identifications answered once Serve has replaced the lost replica."""
DEPLOY_S = 240.0


@dataclass
class Load:
    """Clients identifying detections until stopped; every answer kept with the time it came."""

    url: str
    site: SiteData
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[tuple[float, httpx.Response]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=90) as client:
            i = offset
            while not self.stop.is_set():
                uri = self.site.uris[i % len(self.site.uris)]
                resp = client.post("/api/detections", json=self.site.body(uri), headers=self.site.headers())
                with self.lock:
                    self.answers.append((time.monotonic(), resp))
                i += 1

    def answered_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for at, r in self.answers if at >= t and r.status_code == 201)


def serve_config(cluster: LocalRayCluster, settings: dict[str, Any], port: int) -> dict[str, Any]:
    """Two ReID replicas on the worker group, the proxy and the ingress on the head."""
    args = small_app_args(settings, num_replicas=2, autoscaling_config=None, torch_threads=1)
    on_head = {"ray.io/node-id": cluster.head.node_id}
    app = {
        **app_entry(APP, args),
        "route_prefix": "/",
        "deployments": [
            {"name": "Ingress", "ray_actor_options": {"num_cpus": 0, "label_selector": on_head}},
            {"name": "ReID", "ray_actor_options": {"num_cpus": 0.5, "label_selector": dict(WORKER_LABELS)}},
        ],
    }  # fmt: skip
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]}


def replicas(cluster: LocalRayCluster, name: str) -> list[dict[str, Any]]:
    """The deployment's live replica actors (state API)."""
    return [a for a in cluster.actors() if a["class_name"] == name and a["state"] == "ALIVE"]


def on_two_nodes(cluster: LocalRayCluster, workers: set[str]) -> list[dict[str, Any]] | None:
    found = replicas(cluster, REID_REPLICA)
    return found if len(found) == 2 and {r["node_id"] for r in found} == workers else None


def start_export(url: str, site: SiteData) -> str:
    resp = httpx.post(f"{url}/api/exports", json=export_body("csv"), headers=site.headers(), timeout=30)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


@pytest.fixture
def site(db: psycopg.Connection[Any], tmp_path: Path) -> SiteData:
    return make_site(db, tmp_path / "images", k=4)


@pytest.fixture
def deployed(
    local_ray_cluster: LocalRayCluster, database_url: str, redis_url: str, tmp_path: Path
) -> Iterator[tuple[LocalRayCluster, str, Node, Node]]:
    cluster = local_ray_cluster
    a = cluster.add_node(num_cpus=WORKER_CPUS)
    b = cluster.add_node(num_cpus=WORKER_CPUS)
    port = free_port()
    settings = app_settings(database_url, redis_url, tmp_path)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(cluster, settings, port), sort_keys=False))
    cluster.serve("deploy", str(config))  # as an operator updates a running cluster
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout_s=DEPLOY_S)
    yield cluster, url, a, b


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_losing_a_node_under_load_answers_no_500_replaces_its_replica_and_logs_every_score_once(
    deployed: tuple[LocalRayCluster, str, Node, Node], site: SiteData, db: psycopg.Connection[Any]
) -> None:
    cluster, url, a, b = deployed
    workers = {a.node_id, b.node_id}
    before = wait_until(lambda: on_two_nodes(cluster, workers), what="a ReID replica on each worker node",
                        timeout_s=DEPLOY_S)  # fmt: skip
    ingress = replicas(cluster, INGRESS_REPLICA)
    assert [r["node_id"] for r in ingress] == [cluster.head.node_id], ingress

    load = Load(url, site)
    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = [pool.submit(load.client, i) for i in range(CLIENTS)]
        try:
            started = time.monotonic()
            wait_until(lambda: load.answered_since(started) >= ANSWERS_BEFORE, what="a steady load answered",
                       timeout_s=120)  # fmt: skip
            steady_s = time.monotonic() - started
            lost = a if before[0]["node_id"] == a.node_id else b
            survivor = b if lost is a else a
            lost_replicas = {r["actor_id"] for r in before if r["node_id"] == lost.node_id}
            exports = [start_export(url, site) for _ in range(2)]  # export tasks run on the worker nodes too
            killed_at = time.monotonic()
            cluster.kill_node(lost)
            exports += [start_export(url, site) for _ in range(2)]

            def replaced() -> list[dict[str, Any]] | None:
                now = replicas(cluster, REID_REPLICA)
                fresh = [r for r in now if r["actor_id"] not in lost_replicas]
                return now if len(fresh) == 2 and {r["node_id"] for r in now} == {survivor.node_id} else None

            after = wait_until(replaced, what="Serve replacing the lost ReID replica on the surviving node",
                               timeout_s=DEPLOY_S)  # fmt: skip
            back_at = time.monotonic()
            wait_until(lambda: load.answered_since(back_at) >= ANSWERS_AFTER, what="identifications answered again",
                       timeout_s=120)  # fmt: skip
            recovered_s = time.monotonic() - back_at
        finally:
            load.stop.set()
            for c in clients:
                c.result()

    responses = [r for _, r in load.answers]
    answered = check_identifications(responses)  # 201, or 503 problem+json while capacity was short: no 500
    refused = len(responses) - len(answered)
    assert len(after) == 2
    during = [r for at, r in load.answers if killed_at <= at < back_at]
    rate_before, rate_after = ANSWERS_BEFORE / steady_s, ANSWERS_AFTER / recovered_s
    print(
        f"node loss under load: {len(answered)} identified, {refused} refused with 503; "
        f"{len(during)} answers while a replica was missing ({back_at - killed_at:.1f} s); "
        f"{rate_before:.1f}/s before, {rate_after:.1f}/s after"
    )

    # No export is left processing: each ended (Redis holds its final status), and the completed ones download.
    with httpx.Client(base_url=url, timeout=30) as client:
        finals = [wait_final(client, f"/api/exports/{job}", site.headers(), timeout_s=120) for job in exports]
        assert {f["status"] for f in finals} <= {"completed", "failed"}, finals
        for job in (f for f in finals if f["status"] == "completed"):
            assert client.get(f"/api/exports/{job['id']}/download", headers=site.headers()).status_code == 200
    print(f"exports around the loss: {sorted(f['status'] for f in finals)}")

    # Every answered detection was kept with all its score rows, each logged once.
    stored = db.execute("SELECT count(*) AS n FROM detections WHERE id = ANY(%s)", (answered,)).fetchone()
    assert stored is not None and stored["n"] == len(answered)
    expected = len(answered) * len(site.deer)
    assert wait_score_rows(db, answered, expected, timeout_s=30) == expected
    assert score_duplicates(db, source="online") == 0
