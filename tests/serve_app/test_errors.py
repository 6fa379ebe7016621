"""Domain errors carry no HTTP: images.py raises what went wrong, api/problems.py alone names status and code,
and every error survives pickling (Ray ships a replica's exception to the ingress)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
from PIL import Image

from serve_app.api.problems import image_status
from serve_app.errors import ImageConflict, ImageRejected, JobGone, NotFound, PathRefused, ServiceUnavailable
from serve_app.images import decode_image, read_limited, resolve_image_uri


def _jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (120, 90, 60)).save(out, format="JPEG")
    return out.getvalue()


def _gif() -> bytes:
    out = io.BytesIO()
    Image.new("P", (8, 8)).save(out, format="GIF")
    return out.getvalue()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    (images / "cam").mkdir(parents=True)
    (images / "cam" / "ok.jpg").write_bytes(_jpeg())
    return images


def rejections(root: Path) -> list[tuple[str, object, tuple[int, str]]]:
    """(case, call, the status and problem code clients have always seen for it)."""
    return [
        ("empty uri", lambda: resolve_image_uri("", root=root), (400, "invalid-image-uri")),
        ("nul byte", lambda: resolve_image_uri("cam/a\x00.jpg", root=root), (400, "invalid-image-uri")),
        ("url", lambda: resolve_image_uri("http://example.com/a.jpg", root=root), (400, "image-uri-scheme")),
        ("parent", lambda: resolve_image_uri("../a.jpg", root=root), (400, "image-uri-outside-root")),
        ("absolute", lambda: resolve_image_uri("/etc/passwd", root=root), (400, "image-uri-outside-root")),
        ("long name", lambda: resolve_image_uri("a" * 300 + ".jpg", root=root), (400, "image-uri-too-long")),
        ("missing file", lambda: resolve_image_uri("cam/missing.jpg", root=root), (422, "image-not-found")),
        ("a folder", lambda: read_limited(root / "cam", max_bytes=1 << 20), (422, "image-unreadable")),
        ("too many bytes", lambda: read_limited(root / "cam" / "ok.jpg", max_bytes=10), (413, "image-too-large")),
        ("gif", lambda: decode_image(_gif(), max_pixels=10_000), (415, "unsupported-image-type")),
        ("bomb", lambda: decode_image(_jpeg((200, 200)), max_pixels=100), (413, "decompression-bomb")),
        ("not an image", lambda: decode_image(b"not an image at all", max_pixels=10_000), (422, "invalid-image")),
        ("truncated", lambda: decode_image(_jpeg()[:300], max_pixels=10_000), (422, "corrupt-image")),
    ]


def test_each_refused_image_keeps_its_status_and_code_and_carries_no_http(root: Path) -> None:
    for case, call, expected in rejections(root):
        with pytest.raises(ImageRejected) as caught:
            call()  # type: ignore[operator]
        exc = caught.value
        assert image_status(exc) == expected, (case, type(exc).__name__, exc.detail)
        assert not hasattr(exc, "status") and not hasattr(exc, "code"), case
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and str(copy) == str(exc) and image_status(copy) == expected, case


def test_every_domain_error_survives_pickling_with_its_fields() -> None:
    errors = [
        ImageConflict("cam/a.jpg"),
        ImageConflict("cam/a.jpg", "the batch names one image with two cameras or times"),
        PathRefused("parent", "the path may not contain '..'"),
        ServiceUnavailable("redis", "connection refused"),
        NotFound("camera 7 not found"),
        JobGone(),
    ]
    for exc in errors:
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and str(copy) == str(exc) and vars(copy) == vars(exc), repr(exc)
    assert image_status(ImageConflict("cam/a.jpg")) == (409, "image-conflict")
