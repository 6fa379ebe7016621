"""Crops are downscaled as soon as they are cut, so a held crop's memory does not follow the frame's
resolution, and the model sees the same input within resampling tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from serve_app.reid.embedder import Embedder, ModelSpec
from serve_app.reid.preprocessing import BBox, crop, to_batch


def photo_like(width: int, height: int) -> Image.Image:
    """Smooth gradients and solid shapes (what a trail-camera frame has), not noise."""
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    rgb = np.stack([x * 0.8 + y * 0.2, (1 - x) * 0.5 + y * 0.4, np.sin(6 * x + 3 * y) * 0.3 + 0.5], axis=-1)
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for i in range(12):
        left, top = (i * 397) % (width - width // 8), (i * 211) % (height - height // 8)
        draw.ellipse((left, top, left + width // 9, top + height // 7), fill=(40 + i * 15, 90, 200 - i * 10))
    return image


@pytest.fixture(scope="module")
def frame() -> Image.Image:
    return photo_like(7_000, 5_000)  # 35 megapixels


def test_a_full_frame_crop_is_held_at_most_max_side_px_per_side(frame: Image.Image) -> None:
    held = crop(frame, BBox(0.0, 0.0, 1.0, 1.0))  # every path crops with the default cap
    assert held.size == (448, 448)
    assert len(held.tobytes()) == 448 * 448 * 3  # not 7,000 x 5,000 x 3 = 105 MB
    tall = crop(frame, BBox(0.4, 0.0, 0.02, 1.0), max_side_px=448)
    assert tall.size[1] == 448 and tall.size[0] <= 448  # each side capped on its own
    small = crop(frame, BBox(0.5, 0.5, 0.02, 0.02), max_side_px=448)
    assert small.size == crop(frame, BBox(0.5, 0.5, 0.02, 0.02), max_side_px=None).size  # small crops are not resampled


@pytest.mark.parametrize("bbox", [BBox(0.0, 0.0, 1.0, 1.0), BBox(0.2, 0.3, 0.5, 0.4), BBox(0.6, 0.1, 0.05, 0.5)])
def test_the_model_input_matches_the_full_resolution_crop(frame: Image.Image, bbox: BBox) -> None:
    full = to_batch([crop(frame, bbox, max_side_px=None)], size_px=224)
    small = to_batch([crop(frame, bbox, max_side_px=448)], size_px=224)
    diff = (full - small).abs()
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.5, (float(diff.mean()), float(diff.max()))
    embedder = Embedder(ModelSpec(architecture="resnet18", weights="random", input_size_px=224, device="cpu"))
    a, b = embedder.embed_crops([crop(frame, bbox, max_side_px=None), crop(frame, bbox)])
    assert float(np.dot(a, b)) > 0.999
