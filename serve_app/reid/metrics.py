"""Serve metrics of identification and score logging: part of the ReID deployment's Ray edge.

Only serve_app/reid/deployment.py uses this module: it hands these functions to the plain-Python
Identifier and ScoreBuffer as callbacks, so the domain code never records through Ray itself. The
metrics are created on first use (importing this module needs no Ray). Prometheus names carry Ray's
``ray_`` prefix, e.g. ``ray_trailcam_identifications_total``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

SIMILARITY_BOUNDARIES = [round(0.05 * i, 2) for i in range(1, 21)]
"""0.05 steps over 0..1 (Ray metrics need positive boundaries; negative similarities land in the first bucket)."""
BATCH_SIZE_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0]


@lru_cache(maxsize=1)
def _metrics() -> dict[str, Any]:
    from ray.serve import metrics

    return {
        "identifications": metrics.Counter(
            "trailcam_identifications_total", description="Identifications by decision.", tag_keys=("decision",)
        ),
        "top1": metrics.Histogram(
            "trailcam_top1_similarity",
            description="Top-1 cosine similarity of each identification.",
            boundaries=SIMILARITY_BOUNDARIES,
        ),
        "written": metrics.Counter("trailcam_score_rows_written_total", description="Score rows written."),
        "dropped": metrics.Counter(
            "trailcam_score_rows_dropped_total",
            description="Score rows dropped, by reason (buffer_full, reference_missing, refused, shutdown, ...).",
            tag_keys=("reason",),
        ),
        "batch": metrics.Histogram(
            "trailcam_reid_batch_size", description="Crops per ReID batch.", boundaries=BATCH_SIZE_BOUNDARIES
        ),
    }


def record_identification(decision: str, top1: float | None) -> None:
    """Count one identification and observe its top-1 similarity."""
    m = _metrics()
    m["identifications"].inc(1, tags={"decision": decision})
    if top1 is not None:
        m["top1"].observe(top1)


def record_batch(size: int) -> None:
    """Observe one batch's size."""
    _metrics()["batch"].observe(size)


def record_written(n: int) -> None:
    """Count score rows written."""
    _metrics()["written"].inc(n)


def record_dropped(n: int, reason: str) -> None:
    """Count score rows dropped, tagged with why (ScoreBuffer's reasons)."""
    _metrics()["dropped"].inc(n, tags={"reason": reason})
