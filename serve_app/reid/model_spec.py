"""Which model runs and what it is called: the spec and its version string (torch-free, so reports read it).

A version is ``<architecture>-<weights id>-<input px>``: the weights file's digest, or ``random-seed<N>``
for seeded random weights (tests and the offline demo only; their similarities mean nothing).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

RANDOM_WEIGHTS = "random"
TORCHSCRIPT = "torchscript"


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run: architecture name, weights (``random`` or a local file), seed, input size, device."""

    architecture: str = "resnet50"
    weights: str = RANDOM_WEIGHTS
    seed: int = 7
    input_size_px: int = 224
    device: str = "auto"

    @property
    def random_weights(self) -> bool:
        """True for seeded random weights: tests and the offline demo only, their scores mean nothing."""
        return self.weights == RANDOM_WEIGHTS


def weights_digest(path: Path) -> str:
    """The first 12 hex digits of the weights file's SHA-256 (part of the model version)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def model_version_for(spec: ModelSpec, *, digest: str | None = None) -> str:
    """``<architecture>-<weights id>-<input px>``; random weights say ``random`` and their seed."""
    weights_id = f"{RANDOM_WEIGHTS}-seed{spec.seed}" if spec.random_weights else (digest or "unknown")
    return f"{spec.architecture}-{weights_id}-{spec.input_size_px}"


_RANDOM_VERSION = re.compile(rf"-{RANDOM_WEIGHTS}-seed\d+-\d+$")


def version_has_random_weights(model_version: str) -> bool:
    """Whether a stored version string names random weights (what ``model_version_for`` wrote for such a spec)."""
    return _RANDOM_VERSION.search(model_version) is not None
