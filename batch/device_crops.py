"""Decode and crop detections with torch on the embedding actor's device: the backfill's ``--decode gpu``.

Once the model runs on a GPU, decoding whole frames on the node's few CPUs is what limits a backfill. With
``--decode gpu`` the CPU tasks only read the files; the actor decodes them in batches with nvJPEG
(``torchvision.io.decode_jpeg(device="cuda")``), cuts the crop box and resizes on the device. The box is the
CPU path's (:func:`crop_box_px`) and the resize takes the same two steps (down to at most
:data:`CROP_MAX_SIDE_PX` a side, then to the model input; bilinear with antialiasing, rounded to uint8 after
each, as PIL does), so a score differs from the online path's only by the decoders' and resamplers' rounding,
as in draft mode. Files that are not JPEGs, and JPEGs the decoder refuses, are decoded by PIL one by one.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from serve_app.reid.preprocessing import CROP_MAX_SIDE_PX, BBox, crop_box_px

logger = logging.getLogger(__name__)
_said_refusal = threading.Event()

JPEG_MAGIC = b"\xff\xd8\xff"
DECODE_CHUNK = 64
"""Distinct frames decoded in one call, then cropped and freed: bounds device memory (a 12-megapixel frame
takes 36 MB decoded)."""


def _decode_jpegs(blobs: Sequence[bytes], *, device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 frames [3, H, W] on ``device``, None for a JPEG the decoder refused."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated (TorchCodec supersedes them); they still work,
        # and they are what decodes a batch on the GPU in this version.
        warnings.filterwarnings(
            "ignore", message=".*image decoding and encoding capabilities", category=DeprecationWarning
        )
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass  # one bad file fails the whole batch: decode one at a time to find it
        frames: list[torch.Tensor | None] = []
        for one in data:
            try:
                frames.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                frames.append(None)
        return frames


def _decode_pil(blob: bytes, *, device: torch.device) -> torch.Tensor | str:
    """A frame PIL can read, moved to ``device``; otherwise why not."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            rgb = np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        return f"not decodable: {exc}"
    return torch.from_numpy(rgb).permute(2, 0, 1).to(device)


def decode_frames(blobs: Sequence[bytes], *, device: torch.device) -> list[torch.Tensor | str]:
    """Each file's bytes as an RGB uint8 frame [3, H, W] on ``device``, or the reason it could not be decoded."""
    frames: list[torch.Tensor | str | None] = [None] * len(blobs)
    jpegs = [i for i, blob in enumerate(blobs) if blob.startswith(JPEG_MAGIC)]
    if jpegs:
        for i, frame in zip(jpegs, _decode_jpegs([blobs[i] for i in jpegs], device=device), strict=True):
            frames[i] = frame
        if refused := sum(frames[i] is None for i in jpegs):
            # Each is decoded by PIL on the CPU instead: right, but slow if it is every file. Said once a process
            # at warning level (a decoder that refuses every file would say it for every chunk), then at debug.
            level = logging.DEBUG if _said_refusal.is_set() else logging.WARNING
            _said_refusal.set()
            logger.log(
                level, "the %s JPEG decoder refused %d of %d JPEGs; PIL decodes them", device, refused, len(jpegs)
            )
    return [frame if frame is not None else _decode_pil(blobs[i], device=device) for i, frame in enumerate(frames)]


def _resize(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear with antialiasing (PIL's BILINEAR), rounded to whole uint8 levels as PIL stores them."""
    out = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def crop_resized(frame: torch.Tensor, bbox: BBox, *, size_px: int) -> torch.Tensor:
    """The bbox crop (with the CPU path's margin and box) of a frame [3, H, W], resized to uint8 [S, S, 3]."""
    _, height, width = frame.shape
    left, top, right, bottom = crop_box_px((width, height), bbox)
    cut = frame[:, top:bottom, left:right].unsqueeze(0).float()
    cut_h, cut_w = cut.shape[-2:]
    if max(cut_h, cut_w) > CROP_MAX_SIDE_PX:  # crop() downscales at once; the second resize starts from that
        cut = _resize(cut, (min(cut_h, CROP_MAX_SIDE_PX), min(cut_w, CROP_MAX_SIDE_PX)))
    return _resize(cut, (size_px, size_px))[0].permute(1, 2, 0).to(torch.uint8)


def device_crops(
    uris: Sequence[str], blobs: Sequence[bytes], bboxes: Sequence[BBox], *, size_px: int, device: torch.device
) -> tuple[torch.Tensor, list[str]]:
    """The crops of detections as uint8 [N, S, S, 3] on ``device`` and, per detection, why it has none ("" when
    it has one; its crop is then zeros). Detections of the same image (same URI) share one decode."""
    crops = torch.zeros((len(uris), size_px, size_px, 3), dtype=torch.uint8, device=device)
    errors = [""] * len(uris)
    rows: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        rows.setdefault(uri, []).append(i)
    distinct = list(rows)
    for start in range(0, len(distinct), DECODE_CHUNK):
        chunk = distinct[start : start + DECODE_CHUNK]
        frames = decode_frames([blobs[rows[uri][0]] for uri in chunk], device=device)
        for uri, frame in zip(chunk, frames, strict=True):
            for i in rows[uri]:
                if isinstance(frame, str):
                    errors[i] = f"cannot read {uri.rsplit('/', 1)[-1]}: {frame}"
                else:
                    crops[i] = crop_resized(frame, bboxes[i], size_px=size_px)
        del frames
    return crops, errors
