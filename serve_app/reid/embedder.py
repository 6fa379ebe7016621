"""The embedding model: a torchvision or timm backbone, a fine-tuned re-ID model or a TorchScript file,
giving L2-normalised vectors.

Plain Python, importable by the online path and by batch jobs without a cluster::

    embedder = Embedder(ModelSpec(architecture="resnet18", weights="random", input_size_px=112))
    vectors = embedder.embed_crops([crop(image, bbox)])   # np.ndarray [N, D], float32, unit norm
    embedder.model_version                                # "resnet18-random-seed7-112"
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from serve_app.reid.backbones import build_model
from serve_app.reid.model_spec import PRETRAINED, spec_weights_digest
from serve_app.reid.model_spec import RANDOM_WEIGHTS as RANDOM_WEIGHTS
from serve_app.reid.model_spec import TORCHSCRIPT as TORCHSCRIPT
from serve_app.reid.model_spec import ModelSpec as ModelSpec
from serve_app.reid.model_spec import model_version_for as model_version_for
from serve_app.reid.model_spec import weights_digest as weights_digest
from serve_app.reid.preprocessing import to_batch

logger = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, CPU otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(spec: ModelSpec) -> tuple[torch.nn.Module, str]:
    """The model (eval mode, on CPU) and its version string."""
    digest = spec_weights_digest(spec)
    if spec.architecture == TORCHSCRIPT:
        if spec.random_weights or spec.weights == PRETRAINED:
            raise ValueError("a TorchScript model needs a weights file")
        model: torch.nn.Module = torch.jit.load(spec.weights, map_location="cpu")  # type: ignore[no-untyped-call]
    else:
        model = build_model(spec.architecture, spec.weights, seed=spec.seed, input_size_px=spec.input_size_px)
    return model.eval(), model_version_for(spec, digest=digest)


class Embedder:
    """Turns crops into L2-normalised embeddings with one model; safe to call from one thread at a time."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.device = pick_device(spec.device)
        model, self.model_version = load_model(spec)
        if self.device.type == "cuda":
            model = model.to(self.device).to(memory_format=torch.channels_last)
        self.model = model
        self.embedding_dim = int(self.embed_tensor(self.dummy_batch(1)).shape[1])
        logger.info("embedder %s ready on %s (dim %d)", self.model_version, self.device, self.embedding_dim)

    @property
    def input_size_px(self) -> int:
        """Side of the square input in pixels."""
        return self.spec.input_size_px

    def dummy_batch(self, size: int) -> torch.Tensor:
        """A ready input tensor of ``size`` blank crops (health checks, benchmarks), channels last as
        :func:`to_batch` lays out real crops: on the CPU that layout runs other, faster kernels (MobileNetV2 at
        128 px: 1.2-2.3x), so a blank batch in the default layout would time another computation."""
        size_px = self.input_size_px
        return torch.zeros(size, size_px, size_px, 3).permute(0, 3, 1, 2)

    def preprocess(self, crops: Sequence[Image.Image]) -> torch.Tensor:
        """Crops -> normalized input tensor on CPU."""
        return to_batch(crops, size_px=self.input_size_px)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield

    def embed_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Forward a ready input tensor; returns float32 unit vectors [N, D] on the host."""
        if batch.shape[0] == 0:
            return np.zeros((0, getattr(self, "embedding_dim", 0)), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            if self.device.type == "cuda":
                batch = batch.to(self.device, non_blocking=True, memory_format=torch.channels_last)
            out = self.model(batch)
            if isinstance(out, tuple | list):
                out = out[0]
            out = torch.nn.functional.normalize(out.float().flatten(1), dim=1)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)

    def embed_crops(self, crops: Sequence[Image.Image]) -> np.ndarray:
        """Crops -> float32 unit vectors [N, D]."""
        return self.embed_tensor(self.preprocess(crops))


def embedding_to_bytes(vector: np.ndarray) -> bytes:
    """The stored form of an embedding: little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def embedding_from_bytes(data: bytes) -> np.ndarray:
    """Inverse of :func:`embedding_to_bytes`."""
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
