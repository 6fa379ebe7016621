"""Path confinement: every client- or package-supplied path is refused alike by the API, the batch crops
and the importer (scheme, NUL, '..', absolute, symlink escape, length), and no OS error becomes a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from batch.crops import UnreadableImage, image_path
from serve_app.api.problems import image_status
from serve_app.images import ImageRejected, resolve_image_uri
from tests import factories

PROBLEM = "application/problem+json"
BBOX = {"x": 0.2, "y": 0.2, "w": 0.5, "h": 0.6}
LONG_NAME = "a" * 300 + ".jpg"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An image root holding one image, with a symlink that leaves it."""
    images = tmp_path / "images"
    (images / "cam").mkdir(parents=True)
    (images / "cam" / "ok.jpg").write_bytes(b"jpeg")
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    (images / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (images / "loop.jpg").symlink_to(images / "loop.jpg")
    return images


def hostile(root: Path) -> list[tuple[str, str]]:
    """(case, path): each must be refused before anything is opened."""
    return [
        ("empty", ""),
        ("nul byte", "cam/ok.jpg\x00.png"),
        ("url", "http://example.com/a.jpg"),
        ("file url", "file:///etc/passwd"),
        ("network path", "//host/share/a.jpg"),
        ("parent", "../secret.jpg"),
        ("parent inside", "cam/../cam/ok.jpg"),
        ("absolute outside", str(root.parent / "secret.jpg")),
        ("absolute inside", str(root / "cam" / "ok.jpg")),
        ("symlink escape", "escape.jpg"),
        ("long component", f"cam/{LONG_NAME}"),
        ("long path", "/".join(["d" * 200] * 30) + "/a.jpg"),
    ]


def test_the_api_resolver_refuses_every_hostile_path_with_a_400(root: Path) -> None:
    for case, path in hostile(root):
        try:
            resolve_image_uri(path, root=root)
        except ImageRejected as exc:
            assert image_status(exc)[0] == 400, (case, image_status(exc), exc.detail)
        else:
            pytest.fail(f"{case}: {path[:60]!r} was accepted")
    assert resolve_image_uri("cam/ok.jpg", root=root) == ((root / "cam" / "ok.jpg").resolve(), "cam/ok.jpg")


def test_the_batch_crops_refuse_the_same_paths(root: Path) -> None:
    for case, path in hostile(root):
        try:
            image_path(path, root=root)
        except UnreadableImage:
            continue
        pytest.fail(f"{case}: {path[:60]!r} was accepted")
    assert image_path("cam/ok.jpg", root=root) == (root / "cam" / "ok.jpg").resolve()


def test_a_symlink_loop_or_a_missing_file_is_a_4xx_not_an_os_error(root: Path) -> None:
    for path in ("loop.jpg", "cam/missing.jpg", "cam/ok.jpg/below.jpg"):
        with pytest.raises(ImageRejected) as caught:
            resolve_image_uri(path, root=root)
        status, code = image_status(caught.value)
        assert 400 <= status < 500, (path, code)


def _key_and_camera(db: psycopg.Connection[Any]) -> tuple[dict[str, str], int]:
    site = factories.site(db)
    camera = factories.camera(db, site_id=site)
    return {"Authorization": f"Bearer {factories.api_key(db, sites=[site])}"}, camera


def test_an_image_uri_longer_than_the_file_system_allows_answers_400_on_both_routes(
    serve_url: str, db: psycopg.Connection[Any]
) -> None:
    headers, camera = _key_and_camera(db)
    bodies = [
        {"image_uri": uri, "camera_id": camera, "captured_at": "2024-05-01T06:30:00Z", "bbox": BBOX}
        for uri in (LONG_NAME, f"x/{LONG_NAME}", "/".join(["d" * 256] * 3))
    ]
    with httpx.Client(base_url=serve_url, timeout=60, headers=headers) as client:
        answers = [client.post("/api/detections", json=body) for body in bodies]
        answers.append(client.post("/api/detections/batch", json={"detections": bodies}))
    for resp in answers:
        assert resp.status_code == 400, resp.text
        assert resp.headers["content-type"].startswith(PROBLEM)
        assert resp.json()["code"] == "image-uri-too-long", resp.json()
    assert db.execute("SELECT count(*) AS n FROM detections").fetchone()["n"] == 0
