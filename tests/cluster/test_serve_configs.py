"""serve_config.yaml (CPU) and serve_config.gpu.yaml both deploy the same application."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray._common.utils import import_attr
from ray.serve._private.build_app import build_app as build_serve_graph
from ray.serve.schema import ServeDeploySchema

from serve_app import app as app_module

ROOT = Path(__file__).resolve().parents[2]
CPU = ROOT / "serve_config.yaml"
GPU = ROOT / "serve_config.gpu.yaml"

# What the GPU variant may change relative to the CPU config; everything else must be identical.
GPU_KNOBS = (
    ("proxy_location",),
    ("http_options",),
    ("applications", "trailcam", "args", "ingress"),
    ("applications", "trailcam", "args", "reid", "max_batch_size"),
    ("applications", "trailcam", "args", "reid", "batch_wait_timeout_s"),
    ("applications", "trailcam", "args", "reid", "num_cpus"),
    ("applications", "trailcam", "args", "reid", "num_gpus"),
    ("applications", "trailcam", "args", "reid", "autoscaling_config"),
    ("applications", "trailcam", "args", "reid", "max_ongoing_requests"),
)


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def differences(a: Any, b: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths where a and b differ; named lists compare item by item."""
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(i, dict) and "name" in i for i in a + b):
        a, b = by_name(a), by_name(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in differences(a.get(key), b.get(key), (*path, str(key)))]
    return [] if a == b else [path]


@pytest.mark.parametrize("path", [CPU, GPU], ids=["cpu", "gpu"])
def test_serve_config_passes_serves_own_schema(path: Path) -> None:
    """What `serve deploy` checks first: the file is a valid multi-application config."""
    config = ServeDeploySchema.model_validate(load(path))
    assert [application.name for application in config.applications] == ["trailcam"]


@pytest.mark.parametrize("path", [CPU, GPU], ids=["cpu", "gpu"])
def test_serve_config_builds_the_application(path: Path) -> None:
    """build_app(args) succeeds for the config's args, and every deployment override names a real deployment."""
    for application in load(path)["applications"]:
        assert import_attr(application["import_path"]) is app_module.build_app
        graph = build_serve_graph(app_module.build_app(application.get("args") or {}), name=application["name"])
        names = {deployment.name for deployment in graph.deployments}
        assert graph.ingress_deployment_name == "Ingress"
        assert names == {"Ingress", "ReID"}
        overridden = {override["name"] for override in application.get("deployments", [])}
        assert overridden <= names, f"overrides for deployments the app does not have: {overridden - names}"


def test_gpu_config_gives_each_reid_replica_a_gpu_and_autoscales() -> None:
    application = by_name(load(GPU)["applications"])["trailcam"]
    reid = application["args"]["reid"]
    graph = build_serve_graph(app_module.build_app(application["args"]), name="trailcam")
    built = next(d for d in graph.deployments if d.name == "ReID")
    assert built.ray_actor_options["num_gpus"] == 1
    scaling = built._deployment_config.autoscaling_config
    assert scaling is not None and 1 <= scaling.min_replicas < scaling.max_replicas
    assert scaling.max_replicas == reid["autoscaling_config"]["max_replicas"]
    # A replica must accept enough concurrent requests to fill a batch.
    assert built.max_ongoing_requests >= reid["max_batch_size"]
    assert scaling.target_ongoing_requests <= built.max_ongoing_requests


def test_gpu_config_differs_from_the_cpu_config_only_in_gpu_knobs() -> None:
    """The GPU variant is the same application: model, thresholds and routes match the CPU config."""
    cpu, gpu = load(CPU), load(GPU)
    assert "reid" in by_name(cpu["applications"])["trailcam"].get("args", {}), "serve_config.yaml has no reid args"
    unexpected = [p for p in differences(cpu, gpu) if not any(p[: len(k)] == k for k in GPU_KNOBS)]
    assert not unexpected, f"serve_config.gpu.yaml drifted from serve_config.yaml at {unexpected}"
    cpu_batch = by_name(cpu["applications"])["trailcam"]["args"]["reid"]["max_batch_size"]
    assert by_name(gpu["applications"])["trailcam"]["args"]["reid"]["max_batch_size"] >= cpu_batch


def test_make_run_config_is_serve_config_with_the_cards_model_and_threshold(tmp_path: Path) -> None:
    """cluster/local/serve_config.py: the card's model and recommended threshold, everything else untouched."""
    import json
    import subprocess
    import sys

    card = {
        "architecture": "mobilenet_v2",
        "weights_path": "/models/x.safetensors",
        "input_size_px": 128,
        "recommended_thresholds": {"accept": 0.71, "precision_target": 0.95},
    }
    (tmp_path / "card.json").write_text(json.dumps(card))
    out = tmp_path / "serve_config.yaml"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "cluster" / "local" / "serve_config.py"),
            "--card",
            str(tmp_path / "card.json"),
            "--out",
            str(out),
        ],
        check=True,
    )
    base, made = load(CPU), load(out)
    changed = differences(base, made)
    reid = ("applications", "trailcam", "args", "reid")
    assert set(changed) <= {
        (*reid, "architecture"),
        (*reid, "weights"),
        (*reid, "input_size_px"),
        (*reid, "user_config", "accept_threshold"),
        (*reid, "user_config", "review_threshold"),
    }
    args = by_name(made["applications"])["trailcam"]["args"]["reid"]
    assert args["weights"] == "/models/x.safetensors" and args["input_size_px"] == 128
    base_user = by_name(base["applications"])["trailcam"]["args"]["reid"]["user_config"]
    assert args["user_config"]["accept_threshold"] == 0.71
    band = base_user["accept_threshold"] - base_user["review_threshold"]
    assert args["user_config"]["review_threshold"] == pytest.approx(0.71 - band)
    ServeDeploySchema.model_validate(made)
