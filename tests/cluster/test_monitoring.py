"""Prometheus config, alert rules and the Grafana dashboard: valid, tested, and about real metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from tests.cluster.promql import (
    MONITORING,
    dashboard,
    dashboard_queries,
    expand_recording_rules,
    metric_names,
    rules,
    with_grafana_variables_replaced,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (cluster/monitoring/install.sh installs it)"
)
SERVE_SOURCE = Path(ray.__file__).parent / "serve"

# Metric names the application records (Prometheus adds the ray_ prefix and _total/_bucket).
APP_METRICS = {
    "ray_trailcam_exports_total",
    "ray_trailcam_export_validation_rejections_total",
    "ray_trailcam_export_duration_seconds_bucket",
    "ray_trailcam_identifications_total",
    "ray_trailcam_top1_similarity_bucket",
    "ray_trailcam_score_rows_written_total",
    "ray_trailcam_score_rows_dropped_total",
    "ray_trailcam_reid_batch_size_bucket",
}

# What the issue asks the dashboard to show, as (words in a panel title, metric the panel reads).
REQUIRED_PANELS = [
    ("requests", "ray_serve_num_http_requests_total"),
    ("latency", "ray_serve_http_request_latency_ms_bucket"),
    ("identifications by decision", "ray_trailcam_identifications_total"),
    ("top-1 similarity", "ray_trailcam_top1_similarity_bucket"),
    ("assignment rate", "ray_trailcam_identifications_total"),
    ("score rows", "ray_trailcam_score_rows_written_total"),
    ("score rows", "ray_trailcam_score_rows_dropped_total"),
    ("export jobs by", "ray_trailcam_exports_total"),
    ("export duration", "ray_trailcam_export_duration_seconds_bucket"),
    ("validation rejections by rule", "ray_trailcam_export_validation_rejections_total"),
    ("replicas per deployment", "ray_serve_deployment_replica_healthy"),
]


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, check=False)


def serve_metric_is_defined_in_ray(name: str) -> bool:
    """ray_serve_x(_total|_bucket) is a metric Ray Serve's own source defines as "serve_x"."""
    base = re.sub(r"_(total|bucket|sum|count)$", "", name.removeprefix("ray_"))
    # Proxy metrics are defined once per protocol: f"serve_num_{protocol_name}_requests".
    candidates = {f'"{base}"', f'"{base.replace("_http_", "_{protocol_name}_")}"'}
    sources = [path.read_text() for path in (SERVE_SOURCE / "_private").glob("*.py")]
    return any(candidate in text for text in sources for candidate in candidates)


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", MONITORING / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alerts_fire_when_they_should_and_not_otherwise() -> None:
    """promtool's rule unit tests: low assignment rate, dropped rows, export failures, ReID replicas."""
    result = promtool("test", "rules", MONITORING / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_required_alerts_exist() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert {
        "TrailcamAssignmentRateLow",
        "TrailcamScoreRowsDropped",
        "TrailcamExportFailureRateHigh",
        "TrailcamReIDReplicaMissing",
        "TrailcamReIDReplicaUnhealthy",
    } <= alerts


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", MONITORING / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel query parses (checked by promtool as a recording rule)."""
    queries = dashboard_queries()
    rule_file = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": with_grafana_variables_replaced(expr)}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rule_file))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_has_a_panel_for_each_required_view() -> None:
    panels = [
        (panel["title"].lower(), set().union(*(metric_names(t["expr"]) for t in panel["targets"])))
        for panel in dashboard()["panels"]
        if panel["type"] != "row"
    ]
    for words, metric in REQUIRED_PANELS:
        assert any(words in title and metric in names for title, names in panels), (words, metric)
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard()["uid"] == "trailcam-reid"


def test_dashboard_and_alerts_name_only_app_metrics_or_serve_metrics_defined_by_ray() -> None:
    """Static check (the live one is in test_metrics_scrape): no misspelt or invented metric names."""
    used = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    used |= expand_recording_rules({name for rule in rules() for name in metric_names(rule["expr"])})
    unknown = {
        name
        for name in used
        if name not in APP_METRICS and not (name.startswith("ray_serve_") and serve_metric_is_defined_in_ray(name))
    }
    assert not unknown
    assert not serve_metric_is_defined_in_ray("ray_serve_num_http_requestz_total"), "the check itself must bite"
