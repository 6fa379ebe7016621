"""Batch fixtures: one small demo data set per module, score tables emptied per test."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from batch.demo_data import DemoParams, load_demo
from batch.runs import BackfillOptions
from serve_app.config import Settings
from serve_app.store.db import connect
from tests.fixtures.postgres import truncate_all

DEMO = DemoParams(sites=2, cameras=4, deer=6, images=72, seed=11)
# Small and fast: resnet18 with random weights at 64 px.
SMALL = {"architecture": "resnet18", "weights": "random", "seed": 7, "input_size_px": 64, "batch_size": 16}


@dataclass(frozen=True)
class Demo:
    """A loaded demo data set and settings pointing at it."""

    dsn: str
    image_root: Path
    settings: Settings


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the demo images are rendered (once per session)."""
    return tmp_path_factory.mktemp("demo-images")


@pytest.fixture
def demo(database_url: str, demo_root: Path) -> Demo:
    """The demo data set as the only data in the database (a no-op when it is loaded already)."""
    with psycopg.connect(database_url) as conn:
        other = conn.execute("SELECT count(*) FROM sites WHERE name NOT LIKE 'Demo site %'").fetchone()
    if other and other[0]:
        truncate_all(database_url)
    load_demo(database_url, image_root=demo_root, params=DEMO, workers=2)
    settings = Settings(environment="test", database_url=database_url, image_root=demo_root)
    return Demo(database_url, demo_root, settings)


def reset_scores(dsn: str) -> None:
    """Back to the freshly loaded state: no scores, runs, reports, merges, reviews or automatic decisions."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE reid_similarity_scores, backfill_runs, review_events, threshold_reports, threshold_changes"
        )
        conn.execute("UPDATE deer SET merged_into = NULL WHERE merged_into IS NOT NULL")
        conn.execute(
            "UPDATE detections d SET deer_id = g.deer_id FROM demo_ground_truth g"
            " WHERE g.detection_id = d.id AND d.decision = 'manual' AND d.deer_id IS DISTINCT FROM g.deer_id"
        )
        conn.execute(
            "UPDATE detections SET deer_id = NULL, decision = 'unassigned', top1_similarity = NULL,"
            " reviewed_by = NULL, reviewed_at = NULL WHERE decision <> 'manual'"
        )
        conn.execute("UPDATE detections SET embedding = NULL, model_version = NULL, embedding_model_version = NULL")


@pytest.fixture
def fresh(demo: Demo) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A connection to the demo database with every score and automatic decision removed."""
    reset_scores(demo.dsn)
    with connect(demo.dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def keep_sigterm() -> Iterator[None]:
    """The CLI's main() installs its SIGTERM handler; give pytest its own back afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def small_options(**extra: Any) -> BackfillOptions:
    """Backfill options with the small test model."""
    return BackfillOptions(**{**SMALL, **extra})
