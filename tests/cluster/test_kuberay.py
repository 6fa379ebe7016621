"""The KubeRay manifests validate against the KubeRay v1.7.0 CRDs and deploy what was tested."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.local.ray_workers import WORKER_LABELS, WORKER_RESOURCE
from tests.cluster.kube_schema import CRD_DIR, crd_schemas, load_documents, needs_crds, validation_errors

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
NOT_MANIFESTS = {"serve_overrides.yaml"}
MANIFESTS = sorted(p for p in KUBERAY.glob("*.yaml") if p.name not in NOT_MANIFESTS)
SECRET_SETTINGS = (
    "TRAILCAM_DATABASE_URL",
    "TRAILCAM_REDIS_URL",
    "TRAILCAM_KEY_PEPPER",
    "TRAILCAM_UI_SESSION_SECRET",
    "TRAILCAM_WEBHOOK_SECRET",
)


def documents(kind: str) -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in load_documents(path) if doc["kind"] == kind]


def only(kind: str) -> dict[str, Any]:
    (doc,) = documents(kind)
    return doc


def named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for doc in documents(kind) if doc["metadata"].get("name") == name]
    return doc


def cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    if doc["kind"] == "RayService":
        return [spec["rayClusterConfig"]]
    if doc["kind"] == "RayCronJob":
        return [spec["jobTemplate"]["rayClusterSpec"]]
    return [spec["rayClusterSpec"]]


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        group["template"]
        for cluster in cluster_specs(doc)
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    ]


def ray_documents() -> list[dict[str, Any]]:
    return [doc for kind in ("RayService", "RayJob", "RayCronJob") for doc in documents(kind)]


@needs_crds
def test_the_kuberay_crds_are_there() -> None:
    assert CRD_DIR.is_dir(), f"KubeRay CRDs expected at {CRD_DIR} (a sibling of the repository)"
    kinds = {kind for (api_version, kind) in crd_schemas() if api_version == "ray.io/v1"}
    assert {"RayService", "RayJob", "RayCronJob", "RayCluster"} <= kinds


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_every_manifest_document_validates(path: Path) -> None:
    docs = load_documents(path)
    assert docs
    for doc in docs:
        assert validation_errors(doc) == [], f"{path.name}: {doc['kind']}"


def test_the_expected_resources_exist() -> None:
    assert {doc["kind"] for path in MANIFESTS for doc in load_documents(path)} >= {
        "RayService",
        "RayJob",
        "RayCronJob",
        "Secret",
        "ConfigMap",
    }
    entrypoints = [doc["spec"]["entrypoint"] for doc in documents("RayJob")]
    assert any(e.startswith("python -m batch.backfill") for e in entrypoints)
    assert any(e.startswith("python -m batch.analyze --model-version ") and " --out " in e for e in entrypoints)
    assert any(
        e.startswith("python -m batch.train_data --from-db") and "python -m batch.train " in e for e in entrypoints
    )


@needs_crds
@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][1].update(maxReplicas="eight"),
            "workerGroupSpecs/1/maxReplicas: 'eight' is not of type 'integer'",
            id="wrong-type",
        ),
        pytest.param(
            lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),
            "'groupName' is a required property",
            id="missing-required",
        ),
        pytest.param(
            lambda d: d["spec"]["rayClusterConfig"].update(enableInTreeAutoscalling=True),
            "'enableInTreeAutoscalling' was unexpected",
            id="unknown-field",
        ),
        pytest.param(
            lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
            "rayStartParams/num-cpus: 0 is not of type 'string'",
            id="start-param-not-a-string",
        ),
        pytest.param(
            lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0][
                "resources"
            ]["limits"].update({"nvidia.com/gpu": "one"}),
            "does not match",
            id="bad-quantity",
        ),
        pytest.param(lambda d: d["metadata"].pop("name"), "name or generateName is required", id="no-name"),
    ],
)
def test_the_validator_catches_broken_manifests(mutate: Any, expected: str) -> None:
    """The schema check is real: each kind of mistake in the RayService is reported."""
    doc = only("RayService")
    assert validation_errors(doc) == []
    mutate(doc)
    errors = validation_errors(doc)
    assert any(expected in error for error in errors), errors


@needs_crds
def test_a_raycronjob_without_a_schedule_is_rejected() -> None:
    doc = named("RayCronJob", "trailcam-analyze-weekly")
    del doc["spec"]["schedule"]
    assert any("'schedule' is a required property" in error for error in validation_errors(doc))


def test_serve_config_v2_is_generated_from_the_serve_configs() -> None:
    """rayservice.yaml carries exactly serve_config.gpu.yaml + serve_overrides.yaml (generate.py --check)."""
    result = subprocess.run(
        [sys.executable, str(KUBERAY / "generate.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    printed = subprocess.run(
        [sys.executable, str(KUBERAY / "generate.py"), "--print"], capture_output=True, text=True, check=True
    )
    deployed = yaml.safe_load(only("RayService")["spec"]["serveConfigV2"])
    assert deployed == yaml.safe_load(printed.stdout)
    gpu = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    deployed_reid, gpu_reid = deployed["applications"][0]["args"]["reid"], gpu["applications"][0]["args"]["reid"]
    assert {k: v for k, v in deployed_reid.items() if k != "weights"} == {
        k: v for k, v in gpu_reid.items() if k != "weights"
    }
    assert deployed["applications"][0]["import_path"] == "serve_app.app:build_app"
    assert deployed["http_options"]["host"] == "0.0.0.0"


def test_generate_check_fails_when_the_manifest_is_stale(tmp_path: Path) -> None:
    """--check notices a serve config edit that was not regenerated into the RayService."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kuberay_generate", KUBERAY / "generate.py")
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    edited = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    edited["applications"][0]["args"]["reid"]["autoscaling_config"]["max_replicas"] = 99
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(edited))
    manifest = (KUBERAY / "rayservice.yaml").read_text()
    rendered = generate.render(manifest, generate.serve_config_v2(tmp_path / "gpu.yaml"))
    assert rendered != manifest
    assert "max_replicas: 99" in rendered
    assert generate.render(manifest, generate.serve_config_v2()) == manifest


def test_rayservice_has_head_cpu_and_gpu_groups_with_in_tree_autoscaling() -> None:
    cluster = only("RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no replicas on the head"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu_pod = groups["gpu"]["template"]["spec"]
    (container,) = gpu_pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    # Enough GPU pods for the most ReID replicas Serve's autoscaler may ask for.
    serve = yaml.safe_load(only("RayService")["spec"]["serveConfigV2"])
    reid = serve["applications"][0]["args"]["reid"]
    gpus_needed = reid["autoscaling_config"]["max_replicas"] * reid["num_gpus"]
    assert groups["gpu"]["maxReplicas"] * container["resources"]["limits"]["nvidia.com/gpu"] >= gpus_needed


def test_every_worker_group_has_the_role_label_and_worker_resource_local_worker_nodes_have() -> None:
    """Work placed with the label or the resource, as the docs say to keep it off the head, runs on KubeRay too."""
    (label,) = WORKER_LABELS
    groups = [group for doc in ray_documents() for c in cluster_specs(doc) for group in c.get("workerGroupSpecs", [])]
    assert groups
    for group in groups:
        assert group.get("labels", {}).get(label) == group["groupName"], group["groupName"]
        assert float(group.get("resources", {}).get(WORKER_RESOURCE, 0)) >= 1, group["groupName"]
    for doc in ray_documents():
        for c in cluster_specs(doc):
            head = c["headGroupSpec"]
            assert label not in head.get("labels", {}) and WORKER_RESOURCE not in head.get("resources", {})


def test_dsns_and_the_key_pepper_come_from_kubernetes_secrets() -> None:
    """Every Ray container reads trailcam-secrets; no manifest spells out a DSN or the pepper."""
    for doc in ray_documents():
        for template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                refs = [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
                assert refs == ["trailcam-secrets"], f"{doc['kind']} {container['name']}"
                literal = {env["name"] for env in container.get("env", []) if "value" in env}
                assert not literal & set(SECRET_SETTINGS)
        text = yaml.safe_dump(doc)
        assert "postgresql://" not in text and "redis://:" not in text
    secret = next(doc for doc in documents("Secret") if doc["metadata"]["name"] == "trailcam-secrets")
    assert set(secret["stringData"]) == set(SECRET_SETTINGS)


def test_one_image_and_ray_version_everywhere() -> None:
    images = {c["image"] for doc in ray_documents() for t in pod_templates(doc) for c in t["spec"]["containers"]}
    assert len(images) == 1
    assert {cluster["rayVersion"] for doc in ray_documents() for cluster in cluster_specs(doc)} == {"2.60.0"}


def test_weekly_analysis_schedule() -> None:
    cron = named("RayCronJob", "trailcam-analyze-weekly")["spec"]
    minute, hour, day_of_month, month, day_of_week = cron["schedule"].split()
    assert minute.isdigit() and hour.isdigit(), "a fixed time of day"
    assert (day_of_month, month) == ("*", "*") and day_of_week.isdigit(), "one day a week"
    assert cron["jobTemplate"]["entrypoint"].startswith("python -m batch.analyze --model-version ")
    assert cron["jobTemplate"]["shutdownAfterJobFinishes"] is True


def test_weekly_threshold_change_runs_after_the_analysis_on_the_serving_cluster() -> None:
    """The guarded apply runs on Mondays after the analysis, as a Ray job on the RayService's head (the only
    place its ReID replicas can be asked), and a refusal is not retried."""
    analysis = named("RayCronJob", "trailcam-analyze-weekly")["spec"]
    cron = named("RayCronJob", "trailcam-thresholds-weekly")["spec"]
    minute, hour, day_of_month, month, day_of_week = cron["schedule"].split()
    a_minute, a_hour, *_, a_day_of_week = analysis["schedule"].split()
    assert (day_of_month, month, day_of_week) == ("*", "*", a_day_of_week) and cron["timeZone"] == "Etc/UTC"
    assert (int(hour), int(minute)) > (int(a_hour), int(a_minute)), "after the weekly analysis"
    entrypoint = " ".join(cron["jobTemplate"]["entrypoint"].split())
    service = only("RayService")["metadata"]["name"]
    submit, command = entrypoint.split(" -- ")
    assert submit == f"ray job submit --address http://{service}-head-svc:8265"
    assert command == "python -m batch.thresholds apply --report latest --actor raycronjob/trailcam-thresholds-weekly"
    assert cron["jobTemplate"]["backoffLimit"] == 0 and cron["jobTemplate"]["shutdownAfterJobFinishes"] is True


def test_gcs_fault_tolerance_uses_its_own_redis_and_secret_not_the_export_status_redis() -> None:
    """A head restart reloads Ray's GCS tables from Redis: that Redis is not the one holding export job status
    (TRAILCAM_REDIS_URL), neither the same server nor the same Secret, so neither can evict or flush the other."""
    from urllib.parse import urlsplit

    ft = only("RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    gcs_secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    secrets = {doc["metadata"]["name"]: doc for doc in documents("Secret")}
    app_secret = next(name for name, doc in secrets.items() if "TRAILCAM_REDIS_URL" in doc.get("stringData", {}))
    assert gcs_secret["name"] != app_secret
    assert set(secrets[gcs_secret["name"]]["stringData"]) == {gcs_secret["key"]}, "the GCS secret holds only that"
    app_redis = urlsplit(secrets[app_secret]["stringData"]["TRAILCAM_REDIS_URL"])
    gcs_redis = urlsplit(ft["redisAddress"])
    assert (gcs_redis.hostname, gcs_redis.port) != (app_redis.hostname, app_redis.port)
    # No Ray container is pointed at a GCS Redis another way (RAY_REDIS_ADDRESS would bypass the options).
    for template in pod_templates(only("RayService")):
        for container in template["spec"]["containers"]:
            assert not {env["name"] for env in container.get("env", [])} & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"}
