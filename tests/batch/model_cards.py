"""Model cards as ``batch.train``'s ``write_model`` writes them, for registry tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def card_for(
    weights: Path,
    *,
    architecture: str = "resnet18",
    input_size_px: int = 64,
    accept: float | None = 0.8,
    review: float | None = None,
    top1: float | None = 0.9,
    parent: str | None = "resnet18-imagenet-64",
    samples: int = 120,
) -> Path:
    """Write ``<version>.card.json`` beside a weights file (any bytes: nothing here loads them); returns its path."""
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    version = f"{architecture}-{digest[:12]}-{input_size_px}"
    recommended: dict[str, Any] = {"accept": accept, "precision_target": 0.95}
    if review is not None:
        recommended["review"] = review
    card = {
        "version": version,
        "architecture": architecture,
        "input_size_px": input_size_px,
        "embedding_dim": 64,
        "weights_path": str(weights.resolve()),
        "weights_sha256": digest,
        "parent_version": parent,
        "run": f"run-{digest[:6]}",
        "created_at": "2026-05-01T06:30:00Z",
        "training": {
            "config": {"epochs": 2},
            "data": {
                "samples": samples,
                "individuals": 12,
                "sources": ["demo"],
                "train": samples - 40,
                "known_queries": 14,
                "gallery": 16,
                "stranger_queries": 10,
            },
            "epochs": 2,
        },
        "validation": {
            "top1_known": top1,
            "recommended": {"threshold": accept, "reason": "lowest threshold with precision >= 0.95"},
            "at_recommended": {"precision": 0.96, "known_assigned": 0.9, "strangers_unassigned": 0.95},
        },
        "validation_curve": [],
        "recommended_thresholds": recommended,
    }
    path = weights.with_name(f"{version}.card.json")
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def fake_weights(folder: Path, name: str) -> Path:
    """A weights file of distinct bytes (its digest names the version)."""
    path = folder / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"weights of {name}".encode() * 64)
    return path


def version_of(card: Path) -> str:
    """The version a card names."""
    return str(json.loads(card.read_text())["version"])
