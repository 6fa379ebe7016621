"""Export metrics (Prometheus shows them with a ``ray_`` prefix), created on first use.

They are recorded only inside a Ray process (Serve replica or task), so plain-Python callers
such as unit tests and the bare-uvicorn benchmark import and call this module freely.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import ray

EXPORTS_TOTAL = "trailcam_exports_total"
REJECTIONS_TOTAL = "trailcam_export_validation_rejections_total"
DURATION_SECONDS = "trailcam_export_duration_seconds"
DURATION_BOUNDARIES_S = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]

_metrics: dict[str, Any] = {}
_lock = threading.Lock()


def _metric(name: str) -> Any | None:
    if not ray.is_initialized():
        return None
    with _lock:
        if name not in _metrics:
            from ray.util import metrics

            if name == EXPORTS_TOTAL:
                _metrics[name] = metrics.Counter(
                    name, description="Exports by final status and format.", tag_keys=("status", "format")
                )
            elif name == REJECTIONS_TOTAL:
                _metrics[name] = metrics.Counter(
                    name, description="Export requests rejected, by failed rule.", tag_keys=("rule",)
                )
            else:
                _metrics[name] = metrics.Histogram(
                    name,
                    description="Wall time of an export from runner start to its final status, seconds.",
                    boundaries=DURATION_BOUNDARIES_S,
                    tag_keys=("format",),
                )
        return _metrics[name]


def export_finished(*, status: str, fmt: str, duration_s: float | None = None) -> None:
    """Count a job reaching its final status; observe its duration when the runner knows it."""
    counter = _metric(EXPORTS_TOTAL)
    if counter is not None:
        counter.inc(1, tags={"status": status, "format": fmt})
    if duration_s is not None:
        histogram = _metric(DURATION_SECONDS)
        if histogram is not None:
            histogram.observe(duration_s, tags={"format": fmt})


def validation_rejected(rules: Iterable[str]) -> None:
    """Count a rejected request once per distinct failed rule."""
    counter = _metric(REJECTIONS_TOTAL)
    if counter is None:
        return
    for rule in sorted(set(rules)):
        counter.inc(1, tags={"rule": rule})
