"""GPU tests: the batch fixtures (demo data set) and demo crops; every test here is marked ``gpu``."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from batch.demo_data import DemoParams, plan
from batch.demo_render import make_individual, render_frame
from serve_app.reid.preprocessing import BBox, crop
from tests.batch.conftest import demo, demo_root, fresh  # noqa: F401 - fixtures of the backfill tests

CROPS = DemoParams(sites=2, cameras=6, deer=8, images=12, seed=3)


@pytest.fixture(scope="session")
def demo_crops() -> list[Image.Image]:
    """Twelve crops of rendered demo frames (eight deer, day and night), cut as the online path cuts them."""
    out = []
    for frame in plan(CROPS):
        data, bbox = render_frame(make_individual(CROPS.seed, frame.individual), frame_seed=frame.frame_seed,
                                  night=frame.index % 3 == 0)  # fmt: skip
        out.append(crop(Image.open(io.BytesIO(data)).convert("RGB"), BBox(*bbox)))
    return out
