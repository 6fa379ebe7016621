"""Backbones and weights: torchvision and timm architectures, packaged ImageNet weights, re-ID model files.

Three kinds of weights reach a backbone, none of them downloaded:

- ``imagenet``: ImageNet weights shipped inside an installed registry package (see ``PACKAGED``); the file's
  SHA-256 is checked against the pinned one before use.
- a local file: a state dict (``.pt``/``.pth``, read with ``weights_only``) or a ``.safetensors`` file.
  A *re-ID model file* is a safetensors file written by ``batch.train``: a backbone plus an embedding
  head, with its architecture and input size in the file's metadata.
- ``random``: seeded random initialisation, for tests only (the model version says so).

Architectures are torchvision model names (``resnet50``, ``mobilenet_v2``) or ``timm:<name>`` for any timm
architecture, e.g. ``timm:swin_large_patch4_window12_384`` for MegaDescriptor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision

from serve_app.reid.model_spec import PACKAGED, PRETRAINED, RANDOM_WEIGHTS, TIMM_PREFIX, PackagedWeights, file_sha256

logger = logging.getLogger(__name__)

REID_FORMAT = "trailcam-reid-model/1"


def packaged_weights(architecture: str) -> PackagedWeights:
    """The packaged ImageNet weights of an architecture (ValueError when none are shipped)."""
    try:
        return PACKAGED[architecture]
    except KeyError:
        raise ValueError(
            f"no packaged ImageNet weights for {architecture!r} (available: {', '.join(sorted(PACKAGED))});"
            " give a local weights file instead"
        ) from None


def strip_head(model: torch.nn.Module) -> torch.nn.Module:
    """Replace a torchvision classification head by identity so the model returns its pooled features."""
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attr):
            setattr(model, attr, torch.nn.Identity())
            return model
    raise ValueError(f"do not know the classification head of {type(model).__name__}")


def build_backbone(architecture: str) -> torch.nn.Module:
    """An uninitialised feature extractor (pooled features, no classifier) of a torchvision or timm architecture."""
    if architecture.startswith(TIMM_PREFIX):
        import timm

        name = architecture[len(TIMM_PREFIX) :]
        if not timm.is_model(name):
            raise ValueError(f"unknown timm architecture {name!r}")
        model: torch.nn.Module = timm.create_model(name, pretrained=False, num_classes=0)
        return model
    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown architecture {architecture!r}: a torchvision model name or timm:<name>")
    return strip_head(torchvision.models.get_model(architecture, weights=None))


def _packaged_state(weights: PackagedWeights, backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The packaged file as a state dict of ``backbone``: the deep-sort file holds torchvision's
    ``mobilenet_v2().features`` tensors in the same order under its own key layout."""
    path = weights.path()
    found = file_sha256(path)
    if found != weights.sha256:
        raise ValueError(f"{path}: SHA-256 {found} is not the pinned {weights.sha256}")
    values = list(torch.load(path, map_location="cpu", weights_only=True).values())
    expected = {k: v for k, v in backbone.state_dict().items() if k.startswith("features.")}
    if len(values) != len(expected):
        raise ValueError(f"{path}: {len(values)} tensors, {weights.architecture} features have {len(expected)}")
    state = dict(zip(expected, values, strict=True))
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: tensor for {key} has shape {tuple(value.shape)}")
    return state


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict and its metadata (safetensors metadata; empty for a torch file)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            return {k: handle.get_tensor(k) for k in handle.keys()}, metadata
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds no state dict")
    return dict(state), {}


def load_backbone_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load backbone tensors; every tensor of the (headless) model must be present, keys it lacks (a
    checkpoint's classifier) are ignored."""
    missing, _unexpected = model.load_state_dict(dict(state), strict=False)
    if missing:
        raise ValueError(f"weights {source} lack {len(missing)} backbone tensors, e.g. {missing[0]}")


class ReIDNet(torch.nn.Module):
    """A backbone and an embedding head (linear projection and batch norm), as ``batch.train`` trains it."""

    def __init__(self, backbone: torch.nn.Module, feature_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        self.head = torch.nn.Sequential(
            torch.nn.Linear(feature_dim, embedding_dim, bias=False), torch.nn.BatchNorm1d(embedding_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, embedding_dim], not normalised."""
        features = self.backbone(x)
        return self.head(features.flatten(1))  # type: ignore[no-any-return]


def feature_dim(backbone: torch.nn.Module, input_size_px: int) -> int:
    """The width of a backbone's pooled features at an input size."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, input_size_px, input_size_px))
    backbone.train(was_training)
    return int(out.flatten(1).shape[1])


@dataclass(frozen=True)
class ReIDModelInfo:
    """What a re-ID model file says of itself (its safetensors metadata)."""

    architecture: str
    embedding_dim: int
    input_size_px: int
    extra: dict[str, Any]


def reid_model_info(metadata: Mapping[str, str]) -> ReIDModelInfo | None:
    """The model description in a weights file's metadata, or None for a plain backbone file."""
    if metadata.get("format") != REID_FORMAT:
        return None
    return ReIDModelInfo(
        architecture=metadata["architecture"],
        embedding_dim=int(metadata["embedding_dim"]),
        input_size_px=int(metadata["input_size_px"]),
        extra=json.loads(metadata.get("extra", "{}")),
    )


def save_reid_model(model: ReIDNet, path: Path, *, architecture: str, input_size_px: int, extra: dict[str, Any]) -> str:
    """Write a re-ID model file (safetensors, atomically) and return its SHA-256."""
    from safetensors.torch import save_file

    embedding_dim = model.embedding_dim
    metadata = {
        "format": REID_FORMAT,
        "architecture": architecture,
        "embedding_dim": str(embedding_dim),
        "input_size_px": str(input_size_px),
        "extra": json.dumps(extra, sort_keys=True),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return file_sha256(path)


def build_model(architecture: str, weights: str, *, seed: int, input_size_px: int) -> torch.nn.Module:
    """The embedding network for an architecture and weights (``random``, ``imagenet`` or a local file)."""
    if weights == RANDOM_WEIGHTS:
        logger.warning(
            "RANDOM WEIGHTS: %s is initialised from seed %d; its similarities carry no identity information"
            " (tests only)",
            architecture,
            seed,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_backbone(architecture)
    backbone = build_backbone(architecture)
    if weights == PRETRAINED:
        packaged = packaged_weights(architecture)
        load_backbone_state(backbone, _packaged_state(packaged, backbone), source=f"{packaged.package} ({PRETRAINED})")
        return backbone
    path = Path(weights)
    state, metadata = read_weights_file(path)
    info = reid_model_info(metadata)
    if info is None:
        load_backbone_state(backbone, state, source=str(path))
        return backbone
    if info.architecture != architecture:
        raise ValueError(f"re-ID model file {path} was trained on {info.architecture}, not {architecture}")
    if info.input_size_px != input_size_px:
        raise ValueError(f"re-ID model file {path} takes {info.input_size_px} px inputs, not {input_size_px}")
    net = ReIDNet(backbone, int(state["head.0.weight"].shape[1]), info.embedding_dim)
    net.load_state_dict(state, strict=True)
    return net
