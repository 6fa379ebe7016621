"""Decode and crop detections for the backfill, with the online path's crop and resize.

Exact mode decodes the whole frame, exactly as the online path does, so a backfill score equals
the online score for the same crop and model version. Draft mode lets libjpeg decode at 1/2, 1/4
or 1/8 scale when the crop would still be at least the model input size: several times faster on
large frames, with scores that differ slightly from the online path's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from serve_app.paths import PathRefused, confine
from serve_app.reid.preprocessing import BBox, crop, crop_box_px

DRAFT_SCALES = (8, 4, 2)
"""JPEG DCT scale denominators libjpeg can decode at, largest reduction first."""


class UnreadableImage(OSError):
    """An image URI outside the image root, missing, or not decodable."""


def image_path(uri: str, *, root: Path) -> Path:
    """The real path of a stored image URI under ``root`` (the API's confinement rule, :func:`confine`)."""
    try:
        real, _ = confine(uri, root=root)
    except PathRefused as exc:
        raise UnreadableImage(f"image URI {uri[:200]!r} refused: {exc}") from exc
    return real


def draft_scale(frame: tuple[int, int], bbox: BBox, *, size_px: int) -> int:
    """The largest JPEG reduction that keeps the crop at least ``size_px`` on both sides (1: none)."""
    left, top, right, bottom = crop_box_px(frame, bbox)
    for scale in DRAFT_SCALES:
        if (right - left) / scale >= size_px and (bottom - top) / scale >= size_px:
            return scale
    return 1


def open_frame(path: Path, *, bbox: BBox | None = None, size_px: int = 0, draft: bool = False) -> Image.Image:
    """The decoded RGB frame; in draft mode possibly reduced (bbox is relative, so crops still line up)."""
    try:
        with Image.open(path) as image:
            if draft and bbox is not None and image.format == "JPEG":
                scale = draft_scale(image.size, bbox, size_px=size_px)
                if scale > 1:
                    width, height = image.size
                    image.draft("RGB", (-(-width // scale), -(-height // scale)))
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"cannot read {path.name}: {exc}") from exc


def resized_crop(frame: Image.Image, bbox: BBox, *, size_px: int) -> np.ndarray:
    """The bbox crop resized to the model's square input, uint8 [S, S, 3] (normalized later, in the embedder)."""
    return np.asarray(crop(frame, bbox).resize((size_px, size_px), Image.Resampling.BILINEAR))


def load_crop(path: Path, bbox: BBox, *, size_px: int, draft: bool = False) -> np.ndarray:
    """Read one detection's crop, ready for :func:`serve_app.reid.preprocessing.to_batch`."""
    return resized_crop(open_frame(path, bbox=bbox, size_px=size_px, draft=draft), bbox, size_px=size_px)
