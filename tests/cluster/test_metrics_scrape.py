"""Live: the running app's metrics as Prometheus scrapes them, checked against the dashboard and alerts.

Ray exports application and Serve metrics through each node's metrics agent on the node's
metrics export port (``ray.nodes()[i]["MetricsExportPort"]``); the agent runs even with the
dashboard off, as in the test session. A metric appears only after it was first recorded, so
the test drives the routes that record each one before scraping.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import ray

from tests import factories
from tests.cluster.promql import MONITORING, dashboard_queries, expand_recording_rules, metric_names, rules
from tests.fixtures.ray_cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVE_METRICS = {
    "ray_serve_num_http_requests_total",
    "ray_serve_http_request_latency_ms_bucket",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
    "ray_serve_deployment_status",
}
EXPORT_METRICS = {
    "ray_trailcam_exports_total",
    "ray_trailcam_export_validation_rejections_total",
    "ray_trailcam_export_duration_seconds_bucket",
}
REID_METRICS = {
    "ray_trailcam_identifications_total",
    "ray_trailcam_top1_similarity_bucket",
    "ray_trailcam_score_rows_written_total",
    "ray_trailcam_reid_batch_size_bucket",
}
# Recorded only when the score writer has to drop rows (Postgres unreachable past the buffer
# bound); a Ray counter cannot be exported at 0, so the live scrape cannot see it on a healthy
# system. The re-ID tests force a drop and assert this counter; here its name is checked in source.
EVENT_ONLY = {"ray_trailcam_score_rows_dropped_total"}


def metrics_urls() -> list[str]:
    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node["Alive"] and node.get("MetricsExportPort")
    ]


def scrape() -> dict[str, str]:
    """Metric sample name -> one sample line, from every node."""
    samples: dict[str, str] = {}
    for url in metrics_urls():
        for line in httpx.get(url, timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                samples.setdefault(line.split("{", 1)[0].split(" ", 1)[0], line)
    return samples


def scrape_until(wanted: set[str], timeout_s: float = 90.0) -> dict[str, str]:
    """Scrape until every wanted name is there (Ray exports every few seconds) or the time is up."""
    deadline = time.monotonic() + timeout_s
    samples = scrape()
    while not wanted <= samples.keys() and time.monotonic() < deadline:
        time.sleep(2)
        samples = scrape()
    return samples


def routes(base_url: str) -> set[str]:
    return set(httpx.get(base_url + "/openapi.json", timeout=10).json()["paths"])


def needs_route(base_url: str, path: str, feature: str) -> None:
    """A route the dashboard's metrics depend on; its absence is a broken feature, not a skip."""
    assert path in routes(base_url), f"{path} is not served: the {feature} metrics cannot be recorded"


def jpeg_bytes(seed: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (320, 240), (seed * 40 % 255, 120, 60))
    for x in range(0, 320, 16):
        for y in range(0, 240, 16):
            image.putpixel((x, y), ((x * seed) % 255, (y * 3) % 255, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def drive_exports(base_url: str, headers: dict[str, str]) -> None:
    """An invalid POST (a validation rejection) and one export run to its end (status, duration)."""
    needs_route(base_url, "/api/exports", "export")
    today = dt.datetime.now(dt.UTC).date()
    bad = {"start_date": str(today), "end_date": str(today - dt.timedelta(days=3)), "group_by": "day", "format": "csv"}
    assert httpx.post(base_url + "/api/exports", json=bad, headers=headers, timeout=10).status_code == 400
    good = {**bad, "start_date": str(today - dt.timedelta(days=7)), "end_date": str(today)}
    resp = httpx.post(base_url + "/api/exports", json=good, headers=headers, timeout=10)
    assert resp.status_code == 202, resp.text
    wait_for(
        lambda: (
            httpx.get(base_url + resp.headers["Location"], headers=headers, timeout=10).json()["status"] != "processing"
        )
    )


def drive_identifications(base_url: str, headers: dict[str, str], *, camera_id: int) -> None:
    """Identify a crop, make its detection a deer profile, identify the same crop again (scores, decision)."""
    needs_route(base_url, "/api/detections", "re-ID")
    image = jpeg_bytes(3)
    form = {
        "camera_id": str(camera_id),
        "captured_at": (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat(),
        "bbox": json.dumps({"x": 0.1, "y": 0.1, "w": 0.6, "h": 0.7}),
    }

    def identify() -> dict[str, Any]:
        files = {"image": ("crop.jpg", image, "image/jpeg")}
        resp = httpx.post(base_url + "/api/detections", data=form, files=files, headers=headers, timeout=120)
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    first = identify()
    resp = httpx.post(
        f"{base_url}/api/detections/{first['detection_id']}/assignment",
        json={"new_deer": {"name": "metrics-buck"}},
        headers=headers,
        timeout=30,
    )
    assert resp.status_code in (200, 201), resp.text
    # Once the gallery holds the new profile, an identification has a candidate (a top-1 similarity).
    wait_for(lambda: bool(identify()["candidates"]))


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def dashboard_and_alert_metrics() -> set[str]:
    used = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    return used | expand_recording_rules({name for rule in rules() for name in metric_names(rule["expr"])})


@pytest.mark.slow
def test_serve_metrics_on_the_dashboard_are_exported_by_the_running_app(serve_url: str) -> None:
    for _ in range(5):
        assert httpx.get(serve_url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(serve_url + "/no-such-route", timeout=10).status_code == 404
    used = {name for name in dashboard_and_alert_metrics() if name.startswith("ray_serve_")}
    assert used <= SERVE_METRICS, "a Serve metric the test does not drive"
    samples = scrape_until(used)
    assert used <= samples.keys(), f"not exported: {sorted(used - samples.keys())}"
    deadline = time.monotonic() + 60  # a name can be exported before this test's requests are counted
    while healthz_requests() < 5:
        assert time.monotonic() < deadline, "the five GET /healthz are not counted by route"
        time.sleep(2)


def healthz_requests() -> float:
    lines = scrape_lines("ray_serve_num_http_requests_total")
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'route="/healthz"' in line)


def scrape_lines(name: str) -> list[str]:
    return [
        line
        for url in metrics_urls()
        for line in httpx.get(url, timeout=10).text.splitlines()
        if line.startswith(name + "{")
    ]


@pytest.mark.slow
def test_every_dashboard_metric_is_exported_by_the_running_app(
    serve_url: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """Drive exports and identifications, then every metric a panel or alert names is in the scrape."""
    site_id = factories.site(db)
    camera_id = factories.camera(db, site_id=site_id)
    headers = {"Authorization": f"Bearer {factories.api_key(db, sites=None)}"}
    drive_exports(serve_url, headers)
    drive_identifications(serve_url, headers, camera_id=camera_id)
    used = dashboard_and_alert_metrics()
    assert used - EVENT_ONLY <= SERVE_METRICS | EXPORT_METRICS | REID_METRICS
    samples = scrape_until(used - EVENT_ONLY)
    missing = sorted((used - EVENT_ONLY) - samples.keys())
    assert not missing, f"panels/alerts name metrics the app does not export: {missing}"
    for name in EVENT_ONLY:
        recorded = name.removeprefix("ray_").removesuffix("_total")
        assert any(recorded in path.read_text() for path in (ROOT / "serve_app").rglob("*.py")), name


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (make monitoring installs it)")
def test_make_monitoring_scrapes_the_head_and_loads_the_alerts(ray_session: None, tmp_path: Path) -> None:
    """start.sh brings up Prometheus on 127.0.0.1 against Ray's service discovery; stop.sh stops exactly it."""
    sd_file = tmp_path / "prom_metrics_service_discovery.json"
    targets = [url.removeprefix("http://").removesuffix("/metrics") for url in metrics_urls()]
    sd_file.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    port = free_port()
    env = {
        **os.environ,
        "PROMETHEUS_PORT": str(port),
        "RAY_PROM_SD_FILE": str(sd_file),
        "TRAILCAM_MONITORING_DIR": str(tmp_path / "state"),
        "PATH": os.environ.get("PATH", "") + ":/usr/bin",
    }
    subprocess.run(["bash", str(MONITORING / "start.sh")], env=env, check=True, timeout=120)
    pid = int((tmp_path / "state" / "prometheus.pid").read_text())
    try:
        api = f"http://127.0.0.1:{port}/api/v1"

        def scraped_up() -> bool:
            result = httpx.get(api + "/query", params={"query": 'up{job="ray"}'}, timeout=5).json()["data"]["result"]
            return bool(result) and all(r["value"][1] == "1" for r in result)

        wait_for(scraped_up, timeout_s=60)
        groups = httpx.get(api + "/rules", timeout=5).json()["data"]["groups"]
        loaded = {rule["name"] for group in groups for rule in group["rules"]}
        assert {"TrailcamScoreRowsDropped", "TrailcamReIDReplicaMissing"} <= loaded
    finally:
        subprocess.run(["bash", str(MONITORING / "stop.sh")], env=env, check=True, timeout=60)
    assert not Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "state" / "prometheus.pid").exists()
