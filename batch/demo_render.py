"""Synthetic trail-camera frames: one deer per frame, drawn from a stable per-individual look.

Every individual keeps its coat colour, spot pattern, antler shape and body size; pose, scale,
flip, light, blur and noise vary per frame. Night frames are infrared grey. Plain Python (PIL and
numpy), deterministic for a given seed.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FRAME_W = 1280
FRAME_H = 720


@dataclass(frozen=True)
class Individual:
    """The stable appearance of one synthetic deer."""

    index: int
    coat: tuple[int, int, int]
    belly: tuple[int, int, int]
    spots: tuple[tuple[float, float, float], ...]  # (x, y, radius) relative to the body
    tines: int  # 0 for does
    antler_spread: float
    size: float  # body length relative to a mean adult
    neck: float


def make_individual(seed: int, index: int) -> Individual:
    """The look of individual ``index`` for a demo seed."""
    rng = random.Random(seed * 7919 + index)
    base = (rng.randint(95, 175), rng.randint(60, 120), rng.randint(25, 70))
    belly = tuple(min(255, c + rng.randint(50, 90)) for c in base)
    spots = tuple(
        (rng.uniform(0.15, 0.85), rng.uniform(0.2, 0.7), rng.uniform(0.03, 0.09)) for _ in range(rng.randint(3, 9))
    )
    male = rng.random() < 0.5
    return Individual(
        index=index,
        coat=base,
        belly=(belly[0], belly[1], belly[2]),
        spots=spots,
        tines=rng.randint(2, 6) if male else 0,
        antler_spread=rng.uniform(0.6, 1.4),
        size=rng.uniform(0.8, 1.2),
        neck=rng.uniform(0.8, 1.2),
    )


def _draw_deer(ind: Individual, width: int, height: int) -> Image.Image:
    """The deer on a transparent canvas of the given size, facing right."""
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    body = (0.18 * width, 0.38 * height, 0.78 * width, 0.72 * height)
    leg_w = max(2, int(0.045 * width))
    for lx in (0.24, 0.33, 0.63, 0.72):
        x = lx * width
        draw.rectangle((x, 0.62 * height, x + leg_w, 0.98 * height), fill=ind.coat)
    draw.ellipse(body, fill=ind.coat)
    draw.ellipse((0.25 * width, 0.58 * height, 0.72 * width, 0.72 * height), fill=ind.belly)
    bw, bh = body[2] - body[0], body[3] - body[1]
    for sx, sy, sr in ind.spots:
        cx, cy, r = body[0] + sx * bw, body[1] + sy * bh, sr * bw
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(235, 230, 215))
    neck_top = 0.38 - 0.18 * ind.neck
    draw.polygon(
        [
            (0.66 * width, 0.45 * height),
            (0.80 * width, neck_top * height),
            (0.88 * width, (neck_top + 0.06) * height),
            (0.78 * width, 0.52 * height),
        ],
        fill=ind.coat,
    )
    head = (0.78 * width, (neck_top - 0.06) * height, 0.97 * width, (neck_top + 0.08) * height)
    draw.ellipse(head, fill=ind.coat)
    draw.ellipse(
        (0.93 * width, (neck_top - 0.01) * height, 0.985 * width, (neck_top + 0.04) * height), fill=(30, 25, 20)
    )
    draw.polygon(
        [
            (0.80 * width, (neck_top - 0.04) * height),
            (0.77 * width, (neck_top - 0.13) * height),
            (0.83 * width, (neck_top - 0.05) * height),
        ],
        fill=ind.belly,
    )
    if ind.tines:
        base_x, base_y = 0.85 * width, (neck_top - 0.05) * height
        spread = ind.antler_spread * 0.12 * width
        top_y = base_y - 0.22 * height
        draw.line((base_x, base_y, base_x - spread, top_y), fill=(220, 205, 170), width=max(2, width // 80))
        for t in range(ind.tines):
            f = (t + 1) / (ind.tines + 1)
            px, py = base_x - spread * f, base_y + (top_y - base_y) * f
            draw.line((px, py, px + 0.05 * width, py - 0.07 * height), fill=(220, 205, 170), width=max(2, width // 100))
    draw.polygon(
        [(0.18 * width, 0.45 * height), (0.12 * width, 0.40 * height), (0.17 * width, 0.52 * height)], fill=ind.belly
    )
    return canvas


def _background(rng: random.Random, night: bool) -> Image.Image:
    sky = (rng.randint(120, 190), rng.randint(150, 200), rng.randint(170, 230))
    ground = (rng.randint(60, 110), rng.randint(80, 120), rng.randint(30, 60))
    horizon = rng.randint(220, 360)
    grad = np.zeros((FRAME_H, FRAME_W, 3), dtype=np.float32)
    ys = np.arange(FRAME_H, dtype=np.float32)[:, None]
    top = np.clip(ys / horizon, 0, 1)
    for c in range(3):
        col = np.where(ys < horizon, sky[c] * (0.8 + 0.2 * top), ground[c] * (1.1 - 0.3 * (ys - horizon) / FRAME_H))
        grad[:, :, c] = np.broadcast_to(col, (FRAME_H, FRAME_W))
    img = Image.fromarray(grad.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        x = rng.randint(0, FRAME_W)
        w = rng.randint(20, 70)
        shade = rng.randint(40, 80)
        draw.rectangle((x, 0, x + w, horizon + rng.randint(60, 200)), fill=(shade, shade - 15, shade - 25))
    if night:
        img = img.convert("L").convert("RGB")
    return img


def render_frame(ind: Individual, *, frame_seed: int, night: bool) -> tuple[bytes, tuple[float, float, float, float]]:
    """One JPEG frame of an individual and its relative bbox (x, y, w, h)."""
    rng = random.Random(frame_seed)
    nprng = np.random.default_rng(frame_seed)
    img = _background(rng, night)
    scale = rng.uniform(0.55, 1.0) * ind.size
    deer_w = int(520 * scale)
    deer_h = int(deer_w * 0.8)
    deer = _draw_deer(ind, deer_w, deer_h)
    if rng.random() < 0.5:
        deer = deer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-6, 6)
    deer = deer.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    x = rng.randint(0, max(0, FRAME_W - deer.width))
    y = rng.randint(max(0, FRAME_H // 3 - deer.height // 4), max(FRAME_H // 3, FRAME_H - deer.height))
    y = min(y, max(0, FRAME_H - deer.height))
    img.paste(deer, (x, y), deer)
    alpha_box = deer.getchannel("A").getbbox() or (0, 0, deer.width, deer.height)
    x0, y0 = x + alpha_box[0], y + alpha_box[1]
    x1, y1 = min(FRAME_W, x + alpha_box[2]), min(FRAME_H, y + alpha_box[3])
    arr = np.asarray(img, dtype=np.float32)
    if night:
        arr = arr.mean(axis=2, keepdims=True).repeat(3, axis=2) * rng.uniform(0.7, 1.3) + 25
    else:
        light = rng.uniform(0.6, 1.25)
        warm = np.array([rng.uniform(0.95, 1.08), 1.0, rng.uniform(0.9, 1.05)], dtype=np.float32)
        arr = arr * light * warm
    noise_sigma = rng.uniform(2, 12) * (1.8 if night else 1.0)
    arr += (
        nprng.normal(0.0, noise_sigma, size=(FRAME_H // 4, FRAME_W // 4, 1))
        .astype(np.float32)
        .repeat(4, axis=0)
        .repeat(4, axis=1)
    )
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    blur = rng.uniform(0, 2.0)
    if blur > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    bbox = (
        round(x0 / FRAME_W, 6),
        round(y0 / FRAME_H, 6),
        round((x1 - x0) / FRAME_W, 6),
        round((y1 - y0) / FRAME_H, 6),
    )
    return buf.getvalue(), bbox


def night_hour(hour: int) -> bool:
    """Whether a capture hour is dark enough for the infrared flash."""
    return hour < 6 or hour >= 20
