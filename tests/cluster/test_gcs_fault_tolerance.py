"""Head fault tolerance: the GCS keeps its tables in an external Redis, as KubeRay's ``gcsFaultToleranceOptions``
runs a production head, and its process is SIGKILLed and started again under a Serve app taking traffic and
under a running backfill (tests/fixtures/multinode.py, ``gcs_store``).

The GCS store is a Redis of its own (tests/fixtures/private_services.py); the app's export status lives in the
session's db of the shared Redis. The two never share a server: Ray's tables have no TTLs and their own key
layout, export status keys all expire, and flushing or evicting one must not touch the other.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import yaml

from benchmarks.common import private_haproxy_env, ray_env
from serve_app.exports.scripts import JOB_PREFIX, job_key
from serve_app.store.db import connect
from tests.batch import conftest as batch_fixtures
from tests.batch.conftest import Demo
from tests.batch.test_backfill import expected_rows
from tests.cluster.test_multinode_backfill import (
    RUN_S,
    backfill_driver,
    embed_actors,
    hold_the_run_after_a_block,
    run_row,
)
from tests.fixtures.multinode import LocalRayCluster, short_root
from tests.fixtures.private_services import PrivateRedis, private_redis
from tests.fixtures.ray_cluster import app_entry, app_settings, free_port, small_app_args
from tests.hardening.conftest import SiteData, make_site
from tests.hardening.test_faults import wait_score_rows
from tests.helpers import export_body, score_duplicates
from tests.waiting import sessions_waiting_on_locks, wait_until

ROOT = Path(__file__).resolve().parents[2]
# The batch tests' demo data set and its score reset, and a private Redis, as fixtures of this module too.
demo_root, demo, fresh = batch_fixtures.demo_root, batch_fixtures.demo, batch_fixtures.fresh
__all__ = ["private_redis"]

pytestmark = pytest.mark.slow

PROBLEM = "application/problem+json"
APP = "trailcam"
DEPLOY_S = 240.0
OUTAGE_S = 15.0
"""How long the GCS stays down: past a period of Serve's replica and proxy health checks (10 s) and of the nodes'
(here 1 s, five misses), well short of RAY_gcs_rpc_server_reconnect_timeout_s (60 s), after which raylets, workers
and drivers give up on it and exit."""
OUTAGE_ANSWERS = 10
"""Requests of each kind the app must answer while the GCS is down."""


@dataclass(frozen=True)
class GcsStore:
    """The Redis holding the cluster's GCS tables, and the namespace its keys carry."""

    server: PrivateRedis
    namespace: str

    def keys(self, pattern: str | None = None) -> list[bytes]:
        """Keys matching ``pattern``; by default every key of this cluster's tables (``RAY<namespace>@<table>``)."""
        with redis.Redis(port=self.server.port) as client:
            return sorted(client.scan_iter(match=pattern or f"RAY{self.namespace}@*"))

    def ids(self, table: str) -> set[str]:
        """The ids (hex) in one stored table: NODE, ACTOR, JOB..."""
        with redis.Redis(port=self.server.port) as client:
            return {key.hex() for key in client.hkeys(f"RAY{self.namespace}@{table}") if isinstance(key, bytes)}


@pytest.fixture
def ft_cluster(private_redis: PrivateRedis) -> Iterator[LocalRayCluster]:
    """A head with GCS fault tolerance on (its tables in ``private_redis``) and Serve's HAProxy proxy, as
    cluster/local/ray.env and the KubeRay manifests run it; add worker nodes with ``add_node``."""
    with short_root() as root:
        haproxy = root / "hap"  # short: HAProxy's unix sockets go under it
        haproxy.mkdir()
        env = {**ray_env(), **private_haproxy_env(haproxy)}
        with LocalRayCluster(root, gcs_store=f"127.0.0.1:{private_redis.port}", env=env) as cluster:
            yield cluster


def gcs_store(cluster: LocalRayCluster, server: PrivateRedis) -> GcsStore:
    assert cluster.storage_namespace is not None
    return GcsStore(server, cluster.storage_namespace)


def assert_stores_apart(cluster: LocalRayCluster, store: GcsStore, export_redis_url: str) -> None:
    """The GCS reads and writes the private Redis, and the export-status db holds nothing of Ray's."""
    gcs = cluster.gcs_server()
    assert gcs is not None
    assert f"--redis_port={store.server.port}" in gcs.cmdline()
    with redis.Redis.from_url(export_redis_url) as exports:
        assert exports.connection_pool.connection_kwargs["port"] != store.server.port
        assert not list(exports.scan_iter(match="RAY*")), "Ray's tables in the export-status Redis"
    assert store.keys(), "no GCS table in the GCS store"
    assert not store.keys("trailcam:*"), "export status in the GCS store"


# --- The Serve app ---------------------------------------------------------------------------------------


def deploy(cluster: LocalRayCluster, config: Path, *, port: int, args: dict[str, Any]) -> None:
    """``serve deploy`` of the app at / with its proxy on the head only (every node here shares 127.0.0.1)."""
    entry = {**app_entry(APP, args), "route_prefix": "/"}
    doc = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port}, "applications": [entry]}
    config.write_text(yaml.safe_dump(doc))
    cluster.serve("deploy", str(config))


def app_status(cluster: LocalRayCluster) -> str | None:
    """The app's status as ``serve status`` prints it (RUNNING, DEPLOYING...)."""
    apps = yaml.safe_load(cluster.serve("status")).get("applications") or {}
    status = apps.get(APP, {}).get("status")
    return str(status) if status else None


def serve_actors(cluster: LocalRayCluster) -> dict[str, str]:
    """Serve's live actors (controller, proxy, replicas): actor id -> class name."""
    return {a["actor_id"]: a["class_name"] for a in cluster.actors() if a["state"] == "ALIVE"
            and a["class_name"].startswith(("ServeController", "ProxyActor", "ServeReplica"))}  # fmt: skip


Request = tuple[str, str, str, dict[str, Any] | None]
"""What a traffic loop sends: kind, method, path, JSON body."""


@dataclass
class Answer:
    """One request of the traffic: when it was sent and came back (monotonic), and what it got."""

    kind: str
    sent: float
    done: float
    status: int
    content_type: str
    body: str


@dataclass
class Traffic:
    """Identifications (ingress -> ReID replica -> Postgres) and reads of readiness (Postgres, Redis), an export's
    status (Redis) and the key's profiles (Postgres), in two threads until stopped; every answer is kept."""

    url: str
    site: SiteData
    export_id: str
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self, requests: list[Request]) -> None:
        with httpx.Client(base_url=self.url, timeout=60, headers=self.site.headers()) as client:
            i = 0
            while not self.stop.is_set():
                kind, method, path, body = requests[i % len(requests)]
                sent = time.monotonic()
                try:
                    resp = client.request(method, path, json=body)
                except httpx.HTTPError as exc:  # the proxy refused or dropped us: never acceptable, and the test fails
                    self.errors.append(f"{kind}: {exc!r}")
                    self.stop.set()  # no retrying at full speed against a proxy that is gone
                    return
                finally:
                    i += 1
                self.answers.append(Answer(kind, sent, time.monotonic(), resp.status_code,
                                           resp.headers.get("content-type", ""), resp.text[:300]))  # fmt: skip

    def run(self, pool: ThreadPoolExecutor) -> list[Future[None]]:
        uris = self.site.uris
        identify: list[Request] = [("identify", "POST", "/api/detections", self.site.body(u)) for u in uris]
        reads: list[Request] = [("readyz", "GET", "/readyz", None), ("deer", "GET", "/api/deer", None),
                                ("export", "GET", f"/api/exports/{self.export_id}", None)]  # fmt: skip
        return [pool.submit(self._loop, identify), pool.submit(self._loop, reads)]

    def answered(self, kind: str, *, after: float, before: float = float("inf"), status: int = 200) -> int:
        """Requests of ``kind`` sent after ``after`` and answered ``status`` before ``before``."""
        return sum(a.kind == kind and a.sent >= after and a.done <= before and a.status == status for a in self.answers)


OK = {"identify": 201, "readyz": 200, "export": 200, "deer": 200}


def outage_answers(traffic: Traffic, down_at: float, up_at: float = float("inf")) -> list[int]:
    """For each kind of request, how many were sent after the GCS went down and answered OK before it came back."""
    return [traffic.answered(kind, after=down_at, before=up_at, status=status) for kind, status in OK.items()]


def identified(answers: list[Answer]) -> list[int]:
    """The detection ids identifications answered 201 with."""
    return [int(json.loads(a.body)["detection_id"]) for a in answers if a.kind == "identify" and a.status == 201]


def count(conn: psycopg.Connection[Any], query: str, *params: object) -> int:
    """The ``n`` of a one-row query."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row["n"])


def export_statuses(export_redis_url: str) -> dict[str, str]:
    """Every export job in the export-status Redis: id -> status."""
    with redis.Redis.from_url(export_redis_url, decode_responses=True) as client:
        keys = client.scan_iter(match=JOB_PREFIX + "*")
        return {k.removeprefix(JOB_PREFIX): str(client.hget(k, "status")) for k in keys}


def test_serve_answers_while_the_gcs_is_down_and_the_restarted_gcs_takes_the_cluster_back_from_redis(
    ft_cluster: LocalRayCluster,
    private_redis: PrivateRedis,
    database_url: str,
    redis_url: str,
    redis_client: redis.Redis,
    db: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    cluster = ft_cluster
    store = gcs_store(cluster, private_redis)
    worker = cluster.add_node(num_cpus=2)
    root = tmp_path / "app"
    (root / "images").mkdir(parents=True)
    settings = app_settings(database_url, redis_url, root, export_task_num_cpus=0.01)
    args = small_app_args(settings)
    port = free_port()
    deploy(cluster, tmp_path / "serve.yaml", port=port, args=args)
    wait_until(lambda: app_status(cluster) == "RUNNING", what="the app RUNNING", timeout_s=DEPLOY_S, every_s=1.0)
    url = f"http://127.0.0.1:{port}"
    site = make_site(db, root / "images", k=3)
    with httpx.Client(base_url=url, timeout=60, headers=site.headers()) as client:
        assert client.post("/api/detections", json=site.body(site.uris[0])).status_code == 201
        warm = client.post("/api/exports", json=export_body("csv"))
        assert warm.status_code == 202, warm.text
        warm_id = warm.json()["id"]
        wait_until(lambda: client.get(f"/api/exports/{warm_id}").json()["status"] == "completed",
                   what="the first export completed", timeout_s=60)  # fmt: skip
    assert_stores_apart(cluster, store, redis_url)
    nodes_before = {n["node_id"]: n["state"] for n in cluster.nodes()}
    assert nodes_before == {cluster.head.node_id: "ALIVE", worker.node_id: "ALIVE"}
    assert store.ids("NODE") == set(nodes_before)
    assert any(p.name() == "haproxy" for p in cluster.processes()), "Serve's proxy is not HAProxy"
    actors_before = serve_actors(cluster)
    assert sorted(actors_before.values()) == ["ProxyActor", "ServeController", "ServeReplica:trailcam:Ingress",
                                              "ServeReplica:trailcam:ReID"], actors_before  # fmt: skip

    traffic = Traffic(url, site, warm_id)
    with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=url, timeout=120, headers=site.headers()) as client:
        loops = traffic.run(pool)
        try:
            wait_until(lambda: traffic.answered("identify", after=0, status=201) >= 3, what="traffic flowing")
            # An export whose runner is mid-job when the GCS dies: it waits on a lock of the table of sites (which
            # a Camtrap DP export reads and identifications do not) until just after the kill.
            with psycopg.connect(database_url) as blocker:
                blocker.execute("LOCK TABLE sites IN ACCESS EXCLUSIVE MODE")
                running = client.post("/api/exports", json=export_body("camtrap-dp"))
                assert running.status_code == 202, running.text
                wait_until(lambda: redis_client.hget(job_key(running.json()["id"]), "worker_pid"), what="its runner")
                wait_until(lambda: sessions_waiting_on_locks(db) >= 1, what="the runner waiting on the lock")
                cluster.kill_gcs()
                down_at = time.monotonic()
                blocker.rollback()
            assert cluster.gcs_server() is None
            # Exports asked for while the GCS is down: a task that finds an idle worker runs at once, one that needs
            # a new worker process waits for the GCS (Ray starts no worker process without it).
            during: list[Future[httpx.Response]] = [
                pool.submit(client.post, "/api/exports", json=export_body(fmt)) for fmt in ("json", "camtrap-dp")
            ]
            wait_until(lambda: time.monotonic() - down_at >= OUTAGE_S and min(outage_answers(traffic, down_at))
                       >= OUTAGE_ANSWERS, what="the outage", timeout_s=OUTAGE_S + 30, every_s=0.2)  # fmt: skip
            assert cluster.gcs_server() is None
            restart_at = time.monotonic()
            at_restart = export_statuses(redis_url)
            cluster.restart_gcs()
            up_at = time.monotonic()
            wait_until(lambda: traffic.answered("identify", after=up_at, status=201) >= 3, what="answers after")
        finally:
            traffic.stop.set()
            for loop in loops:
                loop.result()
        late = [f.result() for f in during]

        # Not one 500 and not one refused connection: 200/201, or 503 problem+json for a request that could not
        # be served (the app's rule for a dependency that is down).
        assert not traffic.errors, traffic.errors[:5]
        odd = [a for a in traffic.answers if a.status not in (200, 201)
               and not (a.status == 503 and a.content_type.startswith(PROBLEM))]  # fmt: skip
        assert not odd, odd[:5]
        outage = outage_answers(traffic, down_at, restart_at)
        statuses = collections.Counter(a.status for a in traffic.answers)
        mid_job = at_restart.get(running.json()["id"])
        asked = [at_restart.get(r.json()["id"]) for r in late if r.status_code == 202]
        print(f"GCS down {restart_at - down_at:.1f} s, answered then: {dict(zip(OK, outage, strict=True))};"
              f" all answers {dict(statuses)}; exports when it came back: the one mid-job at the kill {mid_job},"
              f" those asked for while it was down {asked}")  # fmt: skip
        assert min(outage) >= OUTAGE_ANSWERS, outage

        # The restarted GCS read the cluster back from Redis: the same nodes ALIVE, Serve's actors the same ones.
        assert {n["node_id"]: n["state"] for n in cluster.nodes()} == nodes_before
        assert serve_actors(cluster) == actors_before
        assert store.ids("ACTOR") >= set(actors_before)
        assert app_status(cluster) == "RUNNING"
        # The export mid-job at the kill, those asked for while the GCS was down and the first one all ended
        # completed: none stuck in processing.
        assert [r.status_code for r in late] == [202, 202], [r.text for r in late]
        ids = [warm_id, running.json()["id"], *(r.json()["id"] for r in late)]
        wait_until(lambda: all(client.get(f"/api/exports/{i}").json()["status"] == "completed" for i in ids),
                   what="every export completed", timeout_s=120)  # fmt: skip
        assert set(export_statuses(redis_url).values()) == {"completed"}, export_statuses(redis_url)

        # The control plane works again: a changed config deploys (a second ingress replica: a new actor).
        deploy(cluster, tmp_path / "serve.yaml", port=port, args={**args, "ingress": {"num_cpus": 0.25,
                                                                                     "num_replicas": 2}})  # fmt: skip
        wait_until(lambda: list(serve_actors(cluster).values()).count("ServeReplica:trailcam:Ingress") == 2
                   and app_status(cluster) == "RUNNING", what="two ingress replicas RUNNING", timeout_s=DEPLOY_S,
                   every_s=1.0)  # fmt: skip
        assert client.post("/api/detections", json=site.body(site.uris[1])).status_code == 201
    assert_stores_apart(cluster, store, redis_url)

    # Every answered identification is stored with one score row per profile: none lost, none twice.
    answered = identified(traffic.answers)
    assert count(db, "SELECT count(*) AS n FROM detections WHERE id = ANY(%s)", answered) == len(answered)
    expected = len(answered) * len(site.deer)
    assert wait_score_rows(db, answered, expected, timeout_s=30) == expected
    assert score_duplicates(db, source="online") == 0


# --- A backfill ------------------------------------------------------------------------------------------


def test_a_backfill_running_while_the_gcs_is_killed_and_restarted_completes_by_itself_with_every_row_once(
    ft_cluster: LocalRayCluster, demo: Demo, fresh: psycopg.Connection[Any], tmp_path: Path
) -> None:
    cluster = ft_cluster
    cluster.add_node(num_cpus=4)  # both embedding actors (1 CPU each) and room for the read, decode and write tasks
    log = tmp_path / "driver.log"
    with backfill_driver(cluster, demo, log) as driver:
        with connect(demo.dsn) as gate:
            run = hold_the_run_after_a_block(gate, driver)  # mid-way: later blocks wait to commit
            assert 0 < run["done"] < run["total"]
            actors = {a["actor_id"] for a in embed_actors(cluster)}
            cluster.kill_gcs()
            down_at = time.monotonic()
            gate.rollback()

        def outage_over() -> bool:
            assert driver.poll() is None, "the driver ended while the GCS was down"
            return time.monotonic() - down_at >= OUTAGE_S

        wait_until(outage_over, what="the outage", timeout_s=OUTAGE_S + 10, every_s=0.2)
        done_then = count(fresh, "SELECT done AS n FROM backfill_runs")
        cluster.restart_gcs()
        # The restarted GCS knows the run's embedding actors from Redis, and none was restarted.
        restarts = {a["actor_id"]: a["num_restarts"] for a in embed_actors(cluster)}
        assert {a: restarts.get(a) for a in actors} == dict.fromkeys(actors, 0), restarts
        rc = driver.wait(timeout=RUN_S)
    output = log.read_text()
    print(f"backfill: {run['done']}/{run['total']} at the GCS kill, {done_then} when it was started again")
    assert rc == 0 and f"run {run['id']}: completed" in output, output[-4000:]

    # Every score row once, none missing: the run went on by itself, no --resume needed.
    row = run_row(fresh)
    assert (row["state"], row["done"], row["failed"]) == ("completed", row["total"], 0)
    assert row["score_rows"] == expected_rows(fresh)
    scores = count(fresh, "SELECT count(*) AS n FROM reid_similarity_scores WHERE run_id = %s", row["id"])
    assert scores == expected_rows(fresh)
    assert score_duplicates(fresh) == 0
