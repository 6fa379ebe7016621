"""Fixtures split by service; each test session gets its own database and Redis db index."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.redis",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.browser",
]
