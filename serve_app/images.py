"""Safe image loading: URIs confined to the image root, size limits, decompression-bomb guard, verified decode."""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from serve_app.errors import TrailcamError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG"})
UPLOAD_DIR = "uploads"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class ImageRejected(TrailcamError):
    """An image or image URI that is refused before it reaches the model (answered as a 4xx)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(status, code, detail)
        self.status = status
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


def resolve_image_uri(uri: str, *, root: Path) -> tuple[Path, str]:
    """The real path of ``uri`` and its canonical form relative to ``root``; refuses anything outside it.

    No scheme is accepted (no remote fetching, no ``file:``); ``..`` and symlinks that leave the root
    are refused after ``realpath``.
    """
    if not uri or "\x00" in uri:
        raise ImageRejected(400, "invalid-image-uri", "image_uri must be a non-empty path")
    if _SCHEME.match(uri) or uri.startswith("//"):
        raise ImageRejected(400, "image-uri-scheme", "image_uri must be a path under the image root, not a URL")
    real_root = Path(os.path.realpath(root))
    candidate = Path(uri) if os.path.isabs(uri) else real_root / uri
    real = Path(os.path.realpath(candidate))
    if real != real_root and real_root not in real.parents:
        raise ImageRejected(400, "image-uri-outside-root", "image_uri resolves outside the image root")
    if not real.is_file():
        raise ImageRejected(422, "image-not-found", "no image file at image_uri")
    return real, real.relative_to(real_root).as_posix()


def read_limited(path: Path, *, max_bytes: int) -> bytes:
    """The file's bytes, refusing files over ``max_bytes``."""
    if path.stat().st_size > max_bytes:
        raise ImageRejected(413, "image-too-large", f"image file exceeds {max_bytes} bytes")
    return path.read_bytes()


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode and verify a JPEG or PNG; the pixel count is checked from the header before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            fmt, (width, height) = probe.format, probe.size
            if fmt not in ALLOWED_FORMATS:
                raise ImageRejected(415, "unsupported-image-type", "only JPEG and PNG images are accepted")
            if width * height > max_pixels:
                raise ImageRejected(
                    413, "decompression-bomb", f"image of {width}x{height} pixels exceeds {max_pixels} pixels"
                )
            probe.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageRejected(422, "invalid-image", f"not a readable image: {type(exc).__name__}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(422, "corrupt-image", f"image data is corrupt or truncated: {exc}") from exc
    return image.convert("RGB")


def store_upload(data: bytes, *, root: Path, image_format: str) -> str:
    """Save uploaded bytes under ``<root>/uploads/`` by content hash; returns the URI relative to root."""
    suffix = ".png" if image_format == "PNG" else ".jpg"
    rel = f"{UPLOAD_DIR}/{hashlib.sha256(data).hexdigest()}{suffix}"
    target = Path(root) / rel
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return rel
