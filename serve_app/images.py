"""Safe image loading: URIs confined to the image root, size limits, decompression-bomb guard, verified decode."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from serve_app.errors import TrailcamError
from serve_app.paths import PathRefused, confine

ALLOWED_FORMATS = frozenset({"JPEG", "PNG"})
UPLOAD_DIR = "uploads"


class ImageRejected(TrailcamError):
    """An image or image URI that is refused before it reaches the model (answered as a 4xx)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(status, code, detail)
        self.status = status
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


# PathRefused.reason -> (status, problem code) of the API.
_REFUSALS = {
    "empty": (400, "invalid-image-uri"),
    "nul": (400, "invalid-image-uri"),
    "unresolvable": (400, "invalid-image-uri"),
    "scheme": (400, "image-uri-scheme"),
    "absolute": (400, "image-uri-outside-root"),
    "parent": (400, "image-uri-outside-root"),
    "outside": (400, "image-uri-outside-root"),
    "too-long": (400, "image-uri-too-long"),
}


def resolve_image_uri(uri: str, *, root: Path) -> tuple[Path, str]:
    """The real path of ``uri`` and its canonical form relative to ``root``; refuses anything outside it.

    The rule is :func:`serve_app.paths.confine` (no scheme, NUL, ``..``, absolute path, symlink escape or
    over-long name); a refusal or an OS error while looking at the file is a 4xx, never a 500.
    """
    try:
        real, rel = confine(uri, root=root)
    except PathRefused as exc:
        status, code = _REFUSALS[exc.reason]
        raise ImageRejected(status, code, f"image_uri: {exc.detail}") from exc
    try:
        found = real.is_file()
    except OSError as exc:
        raise ImageRejected(422, "image-unreadable", f"image_uri cannot be read: {exc.strerror}") from exc
    if not found:
        raise ImageRejected(422, "image-not-found", "no image file at image_uri")
    return real, rel


def read_limited(path: Path, *, max_bytes: int) -> bytes:
    """The file's bytes, refusing files over ``max_bytes``; an OS error reading it is a 422."""
    try:
        if path.stat().st_size > max_bytes:
            raise ImageRejected(413, "image-too-large", f"image file exceeds {max_bytes} bytes")
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ImageRejected(422, "image-unreadable", f"image file cannot be read: {exc.strerror}") from exc
    if len(data) > max_bytes:  # grew after the stat
        raise ImageRejected(413, "image-too-large", f"image file exceeds {max_bytes} bytes")
    return data


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


def upload_uri(data: bytes, *, camera_id: int, image_format: str) -> str:
    """Where an upload is kept, relative to the image root: one folder per camera, named by content hash."""
    suffix = ".png" if image_format == "PNG" else ".jpg"
    return f"{UPLOAD_DIR}/{camera_id}/{hashlib.sha256(data).hexdigest()}{suffix}"


def store_upload(data: bytes, *, root: Path, image_format: str, camera_id: int) -> str:
    """Save uploaded bytes under ``<root>/uploads/<camera_id>/``; returns the URI relative to root.

    Identical bytes from two cameras are two files (so two independent image rows). Each writer uses its
    own temporary file in the target folder and an atomic rename, so concurrent identical uploads never
    share or tear a file.
    """
    rel = upload_uri(data, camera_id=camera_id, image_format=image_format)
    target = Path(root) / rel
    if target.exists():
        return rel
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return rel
