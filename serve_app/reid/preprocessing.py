"""Crop preparation shared by the online path and the backfill: bbox crop with margin, resize, normalize."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

CROP_MARGIN = 0.1
"""Default margin added on each side of a bbox, as a fraction of the bbox width/height."""

CROP_MAX_SIDE_PX = 448
"""Crops are downscaled to at most this many pixels per side as soon as they are cut, on every path (ingress,
galleries, backfill), so they embed alike and a held crop costs at most 448² x 3 bytes; keep it at least the
largest ReID input size (2x leaves a resampling margin)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, slots=True)
class BBox:
    """A bounding box in coordinates relative to the frame (0-1), origin top-left."""

    x: float
    y: float
    w: float
    h: float

    def __post_init__(self) -> None:
        if not (0 <= self.x <= 1 and 0 <= self.y <= 1 and 0 < self.w <= 1 and 0 < self.h <= 1):
            raise ValueError("bbox values must be relative: 0 <= x, y <= 1 and 0 < w, h <= 1")
        if self.x + self.w > 1.000001 or self.y + self.h > 1.000001:
            raise ValueError("bbox must lie inside the frame (x + w <= 1, y + h <= 1)")


def crop_box_px(size: tuple[int, int], bbox: BBox, *, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom) of a bbox grown by ``margin`` and clipped to the frame."""
    width, height = size
    mx, my = bbox.w * margin, bbox.h * margin
    left = max(0, round((bbox.x - mx) * width))
    top = max(0, round((bbox.y - my) * height))
    right = min(width, round((bbox.x + bbox.w + mx) * width))
    bottom = min(height, round((bbox.y + bbox.h + my) * height))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def crop(
    image: Image.Image, bbox: BBox, *, margin: float = CROP_MARGIN, max_side_px: int | None = CROP_MAX_SIDE_PX
) -> Image.Image:
    """The RGB crop of ``bbox`` (plus margin) from a decoded frame; with ``max_side_px`` each side larger than
    that is downscaled at once (sides independently: the model input is square), so a held crop costs at most
    max_side_px² x 3 bytes whatever the frame's resolution."""
    cut = image.crop(crop_box_px(image.size, bbox, margin=margin))
    if max_side_px is not None and max(cut.size) > max_side_px:
        size = (min(cut.width, max_side_px), min(cut.height, max_side_px))
        cut = cut.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    return cut.convert("RGB")


def to_batch(crops: Sequence[Image.Image], *, size_px: int) -> torch.Tensor:
    """Resize crops to ``size_px`` squares and normalize them into one float tensor [B, 3, S, S]."""
    import torch  # here: the backfill's decode tasks import this module, and a worker that imports torch pays seconds

    arrays = [np.asarray(c.convert("RGB").resize((size_px, size_px), Image.Resampling.BILINEAR)) for c in crops]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std)
