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

from serve_app.errors import (
    CorruptImage,
    ImageNotFound,
    ImageTooLarge,
    ImageTooManyPixels,
    ImageUnreadable,
    ImageUriRefused,
    PathRefused,
    UndecodableImage,
    UnsupportedImageType,
)
from serve_app.errors import ImageRejected as ImageRejected  # re-exported: callers catch it from here
from serve_app.paths import confine

ALLOWED_FORMATS = frozenset({"JPEG", "PNG"})
UPLOAD_DIR = "uploads"


def resolve_image_uri(uri: str, *, root: Path) -> tuple[Path, str]:
    """The real path of ``uri`` and its canonical form relative to ``root``; refuses anything outside it.

    The rule is :func:`serve_app.paths.confine` (no scheme, NUL, ``..``, absolute path, symlink escape or
    over-long name); a refusal or an OS error while looking at the file is an :class:`ImageRejected`.
    """
    try:
        real, rel = confine(uri, root=root)
    except PathRefused as exc:
        raise ImageUriRefused(exc.reason, f"image_uri: {exc.detail}") from exc
    try:
        found = real.is_file()
    except OSError as exc:
        raise ImageUnreadable(f"image_uri cannot be read: {exc.strerror}") from exc
    if not found:
        raise ImageNotFound("no image file at image_uri")
    return real, rel


def read_limited(path: Path, *, max_bytes: int) -> bytes:
    """The file's bytes, refusing files over ``max_bytes``; an OS error reading it is :class:`ImageUnreadable`."""
    try:
        if path.stat().st_size > max_bytes:
            raise ImageTooLarge(f"image file exceeds {max_bytes} bytes")
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ImageUnreadable(f"image file cannot be read: {exc.strerror}") from exc
    if len(data) > max_bytes:  # grew after the stat
        raise ImageTooLarge(f"image file exceeds {max_bytes} bytes")
    return data


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode and verify a JPEG or PNG; the pixel count is checked from the header before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            fmt, (width, height) = probe.format, probe.size
            if fmt not in ALLOWED_FORMATS:
                raise UnsupportedImageType("only JPEG and PNG images are accepted")
            if width * height > max_pixels:
                raise ImageTooManyPixels(f"image of {width}x{height} pixels exceeds {max_pixels} pixels")
            probe.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise UndecodableImage(f"not a readable image: {type(exc).__name__}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"image data is corrupt or truncated: {exc}") from exc
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
