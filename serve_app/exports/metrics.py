"""Export metrics, recorded through whichever backend the process installed (plain Python: no Ray here).

The Serve ingress installs Ray's metrics (:func:`install` with serve_app/exports/task.py's RAY_METRICS, in
serve_app/ingress.py) and records every export it launched when the task reports how it ended, so
Prometheus shows them under the prefix Ray adds. Elsewhere (unit tests, the bare-uvicorn benchmark, a
runner called directly) nothing is installed and recording does nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Protocol

EXPORTS_TOTAL = "trailcam_exports_total"
REJECTIONS_TOTAL = "trailcam_export_validation_rejections_total"
DURATION_SECONDS = "trailcam_export_duration_seconds"
DURATION_BOUNDARIES_S = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]


class Counter(Protocol):
    """A monotonically increasing count with tags."""

    def inc(self, value: float, tags: dict[str, str]) -> object: ...


class Histogram(Protocol):
    """Observed values in fixed buckets, with tags."""

    def observe(self, value: float, tags: dict[str, str]) -> object: ...


class MetricsBackend(Protocol):
    """Creates the metrics (Ray's util metrics at the Ray edges: task.RayMetrics)."""

    def counter(self, name: str, *, description: str, tag_keys: tuple[str, ...]) -> Counter: ...

    def histogram(
        self, name: str, *, description: str, boundaries: Sequence[float], tag_keys: tuple[str, ...]
    ) -> Histogram: ...


class _Registry:
    """The installed backend and the metrics it created (each created once, on first use)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.backend: MetricsBackend | None = None
        self.counters: dict[str, Counter] = {}
        self.histograms: dict[str, Histogram] = {}


_registry = _Registry()


def install(backend: MetricsBackend | None) -> None:
    """Record through ``backend`` from now on (None: record nothing); installing the same one again keeps
    the metrics it already made."""
    with _registry.lock:
        if backend is not _registry.backend:
            _registry.backend = backend
            _registry.counters.clear()
            _registry.histograms.clear()


def _counter(name: str) -> Counter | None:
    with _registry.lock:
        backend = _registry.backend
        if backend is None:
            return None
        if name not in _registry.counters:
            if name == EXPORTS_TOTAL:
                made = backend.counter(
                    name, description="Exports by final status and format.", tag_keys=("status", "format")
                )
            else:
                made = backend.counter(
                    name, description="Export requests rejected, by failed rule.", tag_keys=("rule",)
                )
            _registry.counters[name] = made
        return _registry.counters[name]


def _duration() -> Histogram | None:
    with _registry.lock:
        backend = _registry.backend
        if backend is None:
            return None
        if DURATION_SECONDS not in _registry.histograms:
            _registry.histograms[DURATION_SECONDS] = backend.histogram(
                DURATION_SECONDS,
                description="Wall time of an export from runner start to its final status, seconds.",
                boundaries=DURATION_BOUNDARIES_S,
                tag_keys=("format",),
            )
        return _registry.histograms[DURATION_SECONDS]


def export_finished(*, status: str, fmt: str, duration_s: float | None = None) -> None:
    """Count a job reaching its final status; observe its duration when the run reported one."""
    counter = _counter(EXPORTS_TOTAL)
    if counter is not None:
        counter.inc(1, tags={"status": status, "format": fmt})
    if duration_s is not None:
        histogram = _duration()
        if histogram is not None:
            histogram.observe(duration_s, tags={"format": fmt})


def validation_rejected(rules: Iterable[str]) -> None:
    """Count a rejected request once per distinct failed rule."""
    counter = _counter(REJECTIONS_TOTAL)
    if counter is None:
        return
    for rule in sorted(set(rules)):
        counter.inc(1, tags={"rule": rule})
