"""serve_config.gpu.yaml deployed as it is (only the settings point at the test services): its ReID replica holds
a GPU, loads the model on CUDA and identifies over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import ray
import yaml
from ray import serve

from serve_app.app import build_app
from tests import factories
from tests.fixtures.ray_cluster import app_settings, wait_ready
from tests.helpers import auth, write_jpeg

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
APP = "gpu-config"
BBOX = {"x": 0.2, "y": 0.2, "w": 0.5, "h": 0.6}


def test_gpu_config_replica_holds_a_gpu_and_identifies_on_cuda(
    serve_http_port: int, database_url: str, redis_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    (application,) = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())["applications"]
    reid = application["args"]["reid"]
    args = {**application["args"], "settings": app_settings(database_url, redis_url, tmp_path)}
    gpus_free = ray.available_resources().get("GPU", 0)
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    try:
        url = f"http://127.0.0.1:{serve_http_port}/{APP}"
        wait_ready(url, timeout_s=240)
        described = serve.get_deployment_handle("ReID", app_name=APP).describe.remote().result(timeout_s=60)
        assert described["device"].startswith("cuda")
        assert described["max_batch_size"] == reid["max_batch_size"]
        assert described["model_version"].startswith(f"{reid['architecture']}-")
        assert described["model_version"].endswith(f"-{reid['input_size_px']}")
        assert gpus_free - ray.available_resources().get("GPU", 0) >= reid["num_gpus"]

        site = factories.site(db)
        camera = factories.camera(db, site_id=site)
        uri = write_jpeg(tmp_path / "images", "gallery/0.jpg", seed=11, size=(640, 480))
        image = factories.image(db, camera_id=camera, uri=uri, width=640, height=480)
        deer = factories.deer(db, site_id=site)
        factories.detection(db, image_id=image, deer_id=deer, bbox=(BBOX["x"], BBOX["y"], BBOX["w"], BBOX["h"]))
        body = {"image_uri": uri, "camera_id": camera, "captured_at": captured_at(db, image), "bbox": BBOX}
        resp = httpx.post(url + "/api/detections", json=body, headers=auth(factories.api_key(db, sites=[site])),
                          timeout=120)  # fmt: skip
        assert resp.status_code == 201, resp.text
        answer = resp.json()
        # The gallery crop itself: its own deer, at a similarity bfloat16 keeps near 1 (accept is 0.95).
        assert answer["candidates"][0]["deer_id"] == deer and answer["candidates"][0]["similarity"] >= 0.98
        assert answer["decision"] == "auto" and answer["model_version"] == described["model_version"]
    finally:
        serve.delete(APP)


def captured_at(db: psycopg.Connection[Any], image: int) -> str:
    """The image's capture time as the API takes it (a recorded image is named with its own time)."""
    row = db.execute("SELECT captured_at FROM images WHERE id = %s", (image,)).fetchone()
    return str(row["captured_at"].isoformat())
