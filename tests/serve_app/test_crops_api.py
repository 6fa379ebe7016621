"""GET /api/detections/{id}/crop on the app the ingress builds (real Postgres and Redis, no Ray): the box as a
JPEG, bounded in size, cached by ETag, 404 for another site's detection or a missing image file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from PIL import Image

from tests import factories
from tests.helpers import auth
from tests.serve_app.test_threshold_history_api import run  # noqa: F401 - the fixture


def two_halves(root: Path, rel: str) -> str:
    """A 1200x600 JPEG: red on the left half, blue on the right."""
    pixels = np.zeros((600, 1200, 3), dtype=np.uint8)
    pixels[:, :600] = (220, 30, 30)
    pixels[:, 600:] = (30, 30, 220)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return rel


def test_crop_is_the_boxes_pixels_bounded_cached_and_site_checked(
    db: psycopg.Connection[Any],
    run: Any,  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    site, other = factories.site(db), factories.site(db)
    camera = factories.camera(db, site_id=site)
    uri = two_halves(tmp_path / "images", "cam/frame.jpg")
    image = factories.image(db, camera_id=camera, uri=uri, width=1200, height=600)
    # Tall boxes (240x480 px) in the red half's middle and the blue half's; the margin stays inside each half.
    red = factories.detection(db, image_id=image, bbox=(0.15, 0.1, 0.2, 0.8))
    blue = factories.detection(db, image_id=image, bbox=(0.65, 0.1, 0.2, 0.8))
    gone = factories.detection(db, image_id=factories.image(db, camera_id=camera, uri="cam/missing.jpg"))
    key, stranger = factories.api_key(db, sites=[site]), factories.api_key(db, sites=[other])

    async def body(client: httpx.AsyncClient) -> None:
        first = await client.get(f"/api/detections/{red}/crop", headers=auth(key))
        assert first.status_code == 200, first.text
        assert first.headers["content-type"] == "image/jpeg"
        picture = Image.open(io.BytesIO(first.content)).convert("RGB")
        assert max(picture.size) <= 384 and picture.size[0] < picture.size[1]
        r, _, b = np.asarray(picture).reshape(-1, 3).mean(axis=0)
        assert r > 180 and b < 70
        small = await client.get(f"/api/detections/{blue}/crop", params={"size": 64}, headers=auth(key))
        assert max(Image.open(io.BytesIO(small.content)).size) <= 64
        r, _, b = np.asarray(Image.open(io.BytesIO(small.content)).convert("RGB")).reshape(-1, 3).mean(axis=0)
        assert b > 180 and r < 70

        etag = first.headers["etag"]
        again = await client.get(f"/api/detections/{red}/crop", headers={**auth(key), "If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert small.headers["etag"] != etag

        for response in (
            await client.get(f"/api/detections/{red}/crop", headers=auth(stranger)),  # another site's
            await client.get("/api/detections/999999/crop", headers=auth(key)),
        ):
            assert response.status_code == 404
            assert response.headers["content-type"].startswith("application/problem+json")
        missing = await client.get(f"/api/detections/{gone}/crop", headers=auth(key))
        assert missing.status_code == 404 and missing.json()["code"] == "image-unavailable"
        for size in ("8", "5000", "x"):
            bad = await client.get(f"/api/detections/{red}/crop", params={"size": size}, headers=auth(key))
            assert bad.status_code in (400, 422) and bad.headers["content-type"].startswith("application/problem")
        assert (await client.get(f"/api/detections/{red}/crop")).status_code == 401

    run(body)
