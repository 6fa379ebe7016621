"""Fixtures split by service; each test session gets its own database and Redis db index."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.redis",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.browser",
    "tests.fixtures.multinode",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need CUDA: without it they are skipped, saying why (pyproject.toml registers the marker)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only sessions that collected gpu tests pay for the import

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA, and torch.cuda.is_available() is False on this machine")
    for item in gpu_items:
        item.add_marker(skip)
