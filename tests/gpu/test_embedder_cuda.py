"""The embedder's CUDA branch: ``device: auto`` runs on the GPU in bfloat16 (autocast, channels_last) and gives
the CPU's embeddings within bfloat16's tolerance; an explicit ``cpu`` stays on the CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.reid.embedder import Embedder, ModelSpec
from tests.gpu.tolerance import MAX_SIMILARITY_SHIFT, MIN_COSINE

pytestmark = pytest.mark.gpu

SERVED = ModelSpec("mobilenet_v2", "imagenet", input_size_px=128)  # serve_config(.gpu).yaml's model
BACKFILL_BENCH = ModelSpec("resnet50", "random", input_size_px=224)  # the GPU check's backfill model


@pytest.mark.parametrize("spec", [SERVED, BACKFILL_BENCH], ids=["mobilenet_v2-128", "resnet50-224"])
def test_auto_device_embeds_on_cuda_in_bfloat16(spec: ModelSpec, demo_crops: list[Image.Image]) -> None:
    embedder = Embedder(spec)
    assert embedder.device.type == "cuda"
    assert {p.device.type for p in embedder.model.parameters()} == {"cuda"}
    seen: list[tuple[torch.dtype, bool]] = []
    first_conv = next(m for m in embedder.model.modules() if isinstance(m, torch.nn.Conv2d))
    handle = first_conv.register_forward_hook(
        lambda _m, args, out: seen.append((out.dtype, args[0].is_contiguous(memory_format=torch.channels_last)))
    )
    try:
        vectors = embedder.embed_crops(demo_crops)
    finally:
        handle.remove()
    assert seen and all(dtype == torch.bfloat16 and channels_last for dtype, channels_last in seen), seen
    assert vectors.dtype == np.float32 and vectors.shape == (len(demo_crops), embedder.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_cuda_embeddings_equal_the_cpu_ones_within_bfloat16_tolerance(demo_crops: list[Image.Image]) -> None:
    gpu = Embedder(SERVED)
    cpu = Embedder(dataclasses.replace(SERVED, device="cpu"))
    assert (gpu.device.type, cpu.device.type) == ("cuda", "cpu")
    # Scores from either device carry one model version: the version names the weights, not the device.
    assert gpu.model_version == cpu.model_version
    on_gpu, on_cpu = gpu.embed_crops(demo_crops), cpu.embed_crops(demo_crops)
    cosine = (on_gpu * on_cpu).sum(axis=1)
    assert cosine.min() >= MIN_COSINE, cosine
    # What decisions are made on: the similarities between crops.
    shift = np.abs(on_gpu @ on_gpu.T - on_cpu @ on_cpu.T).max()
    assert shift <= MAX_SIMILARITY_SHIFT
    # A CPU tensor handed to embed_tensor is moved to the GPU; an empty batch keeps the embedding width.
    moved = gpu.embed_tensor(gpu.preprocess(demo_crops[:3]))
    assert (moved * on_cpu[:3]).sum(axis=1).min() >= MIN_COSINE
    assert gpu.embed_tensor(gpu.dummy_batch(0)).shape == (0, gpu.embedding_dim)


def test_an_explicit_cpu_device_stays_on_the_cpu_beside_cuda(demo_crops: list[Image.Image]) -> None:
    embedder = Embedder(ModelSpec("resnet18", "random", input_size_px=64, device="cpu"))
    assert embedder.device.type == "cpu"
    assert {p.device.type for p in embedder.model.parameters()} == {"cpu"}
    assert embedder.embed_crops(demo_crops[:2]).shape == (2, embedder.embedding_dim)
