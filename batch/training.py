"""Metric learning for re-ID: the network, the ArcFace loss, trail-camera augmentations, one epoch, validation.

Used by the Ray Train job (``batch.train``) on every worker, and by the plain single-process loop the
benchmark compares it with. Validation embeds crops exactly as serving does (``to_batch``: square resize,
ImageNet normalisation), so its figures are the product's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from batch.quality import Query, best_matches, evaluate
from batch.train_data import Sample, Split
from serve_app.reid.backbones import ReIDNet, build_backbone, build_model, feature_dim
from serve_app.reid.preprocessing import IMAGENET_MEAN, IMAGENET_STD, to_batch

# glibc's allocator settings for a process that trains (a Ray Train worker). Ray Train runs the training loop in
# a thread of the worker, and glibc serves such a thread from a secondary arena, whose heaps it unmaps as soon as
# they empty; tensors above its mmap threshold are mapped and unmapped on every use in any arena. MobileNetV2's
# activations at batch 64 and 128 px are 30-100 MB each, so every step mapped them afresh and spent more time in
# page faults than in arithmetic: 23 samples/s in the worker against 41-53 in a plain loop on the main thread.
# One arena, no mmap and no trimming keep the freed memory for the next step (the worker's resident set stays at
# the largest step's) and took both to 57-73 samples/s on two cores. Read by glibc when a process starts, so they
# are set in the worker's environment (``worker_runtime_env``), not from Python. Measured for CPU training only:
# a GPU worker's activations live on the GPU, and it keeps its node's settings (ray.env's or the KubeRay
# ConfigMap's MALLOC_ARENA_MAX=2).
TRAINING_ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def allocator_env_seen() -> dict[str, str]:
    """The allocator settings of TRAINING_ALLOCATOR_ENV as this process's environment has them ("" where unset)."""
    return {name: os.environ.get(name, "") for name in TRAINING_ALLOCATOR_ENV}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored in its checkpoints and its model card)."""

    data: str
    architecture: str = "mobilenet_v2"
    weights: str = "imagenet"
    input_size_px: int = 128
    embedding_dim: int = 256
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    backbone_lr_scale: float = 0.5
    weight_decay: float = 1e-4
    arcface_scale: float = 30.0
    arcface_margin: float = 0.3
    seed: int = 0
    val_fraction: float = 0.25
    precision_target: float = 0.95
    max_steps_per_epoch: int = 0  # 0: the whole training split each epoch

    def as_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


class ArcFace(torch.nn.Module):
    """Additive angular margin loss (ArcFace): cosine logits with margin ``m`` on the true class, scaled by ``s``."""

    def __init__(self, embedding_dim: int, classes: int, *, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(classes, embedding_dim))
        torch.nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the margin logits, in float32 whatever the autocast (bf16 rounds cosines
        near 1 to exactly 1)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1, 1)
            sine = torch.sqrt((1.0 - cosine * cosine).clamp(min=1e-7))
            # cos(theta + m) without acos; past theta = pi - m the margin would wrap around, so fall back to
            # the linear penalty CosFace-style implementations use there.
            target = cosine * math.cos(self.margin) - sine * math.sin(self.margin)
            target = torch.where(
                cosine > math.cos(math.pi - self.margin), target, cosine - math.sin(math.pi - self.margin) * self.margin
            )
            one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
            logits = self.scale * (one_hot * target + (1 - one_hot) * cosine)
            return F.cross_entropy(logits, labels)


class Trainee(torch.nn.Module):
    """The re-ID network and its loss head, trained together (one module for DDP)."""

    def __init__(self, net: ReIDNet, loss: ArcFace) -> None:
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of a batch."""
        return self.loss(self.net(images), labels)  # type: ignore[no-any-return]


def build_trainee(config: TrainConfig, classes: int, *, pretrained: bool = True) -> Trainee:
    """A network on the starting weights (``pretrained``; otherwise an uninitialised backbone to load a
    checkpoint into), a fresh embedding head and an ArcFace head (seeded). Starting from a re-ID model file
    keeps its backbone and trains a new head."""
    torch.manual_seed(config.seed)
    if pretrained:
        start = build_model(config.architecture, config.weights, seed=config.seed, input_size_px=config.input_size_px)
        backbone = start.backbone if isinstance(start, ReIDNet) else start
    else:
        backbone = build_backbone(config.architecture)
    net = ReIDNet(backbone, feature_dim(backbone, config.input_size_px), config.embedding_dim)
    return Trainee(
        net, ArcFace(config.embedding_dim, classes, scale=config.arcface_scale, margin=config.arcface_margin)
    )


def trail_camera_augment(size_px: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Augmentations that match trail cameras: scale and crop, flips, light and colour cast, infrared grey,
    blur and sensor noise. Takes and returns uint8 [3, H, W]; returns a normalised float [3, S, S]."""
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(size_px, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            # No hue shift: on CPU it cost as much as a fifth of a training step, and trail cameras' colour
            # casts are white balance (brightness, contrast, saturation) and infrared grey.
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.3),
            v2.RandomGrayscale(p=0.35),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.8))], p=0.35),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def apply(image: torch.Tensor) -> torch.Tensor:
        out = pipeline(image)
        if torch.rand(()) < 0.5:
            out = (out + torch.randn_like(out) * torch.empty(()).uniform_(0.01, 0.05)).clamp(0, 1)
        return (out - mean) / std  # type: ignore[no-any-return]

    return apply


class CropSet(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Training crops held in memory (uint8), augmented on each access."""

    def __init__(self, images: Sequence[torch.Tensor], labels: Sequence[int], size_px: int) -> None:
        self.images, self.labels = list(images), list(labels)
        self.augment = trail_camera_augment(size_px)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.augment(self.images[index]), self.labels[index]


def load_crops(root: Path, samples: Sequence[Sample], indices: Sequence[int], *, side_px: int) -> list[Image.Image]:
    """Decoded crops of the given samples, each at most ``side_px`` a side."""
    out = []
    for i in indices:
        with Image.open(root / samples[i].file) as image:
            crop = image.convert("RGB")
        crop.thumbnail((side_px, side_px), Image.Resampling.BILINEAR)
        out.append(crop)
    return out


def training_set(root: Path, samples: Sequence[Sample], split: Split, size_px: int) -> tuple[CropSet, list[str]]:
    """The training split as a dataset, and its class names (label i is names[i])."""
    names = sorted({samples[i].individual for i in split.train})
    index = {name: k for k, name in enumerate(names)}
    crops = load_crops(root, samples, split.train, side_px=round(size_px * 1.25))
    tensors = [torch.from_numpy(np.asarray(c).copy()).permute(2, 0, 1) for c in crops]
    labels = [index[samples[i].individual] for i in split.train]
    return CropSet(tensors, labels, size_px), names


def optimizer_for(trainee: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with a lower rate for the pretrained backbone than for the new heads."""
    inner: Any = getattr(trainee, "module", trainee)
    backbone = list(inner.net.backbone.parameters())
    ids = {id(p) for p in backbone}
    rest = [p for p in inner.parameters() if id(p) not in ids]
    return torch.optim.AdamW(
        [{"params": backbone, "lr": config.lr * config.backbone_lr_scale}, {"params": rest, "lr": config.lr}],
        weight_decay=config.weight_decay,
    )


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_epoch(
    trainee: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    max_steps: int = 0,
) -> dict[str, float]:
    """One pass over the batches; returns the mean loss, samples and seconds."""
    trainee.train()
    losses, samples, started = [], 0, time.monotonic()
    for step, (images, labels) in enumerate(batches):
        if max_steps and step >= max_steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = trainee(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        samples += len(labels)
    return {
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "samples": samples,
        "seconds": time.monotonic() - started,
    }


@torch.inference_mode()
def embed(net: torch.nn.Module, crops: Sequence[Image.Image], *, size_px: int, device: torch.device) -> np.ndarray:
    """Unit embeddings of crops, preprocessed exactly as serving does."""
    net.eval()
    out = []
    for start in range(0, len(crops), 128):
        batch = to_batch(crops[start : start + 128], size_px=size_px).to(device)
        out.append(F.normalize(net(batch).float().flatten(1), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


def validate(
    net: torch.nn.Module,
    root: Path,
    samples: Sequence[Sample],
    split: Split,
    config: TrainConfig,
    *,
    device: torch.device,
) -> dict[str, Any]:
    """Known queries against the held-out gallery, strangers against it too: top-1 and the threshold figures."""
    side = round(config.input_size_px * 1.25)
    gallery = embed(
        net, load_crops(root, samples, split.gallery, side_px=side), size_px=config.input_size_px, device=device
    )
    labels = [samples[i].individual for i in split.gallery]
    query_indices = split.known_queries + split.stranger_queries
    queries = embed(
        net, load_crops(root, samples, query_indices, side_px=side), size_px=config.input_size_px, device=device
    )
    known = set(split.known_queries)
    matches = best_matches(queries, gallery, labels)
    return evaluate(
        [
            Query(
                sim, who, samples[i].individual if i in known else None, None if i in known else samples[i].individual
            )
            for i, (sim, who) in zip(query_indices, matches, strict=True)
        ],
        target=config.precision_target,
    )


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The validation figures a progress line and a model card carry (no per-threshold curve)."""
    at = metrics.get("at_recommended") or {}
    return {
        "top1_known": metrics["top1_known"],
        "recommended_threshold": metrics["recommended"]["threshold"],
        "precision": at.get("precision"),
        "known_assigned": at.get("known_assigned"),
        "strangers_unassigned": at.get("strangers_unassigned"),
        "baks": at.get("baks"),
        "baus": at.get("baus"),
    }


def loader(
    dataset: CropSet, config: TrainConfig, *, epoch: int, sampler: Any = None
) -> torch.utils.data.DataLoader[Any]:
    """Shuffled batches, the order fixed by the seed and the epoch (or by a distributed sampler)."""
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        drop_last=True,
        num_workers=0,
    )
