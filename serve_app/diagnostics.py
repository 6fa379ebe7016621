"""Memory diagnostics of a long-lived process: what it holds and what grew, for the soak and for operators.

``TRAILCAM_TRACEMALLOC_FRAMES`` (an integer, read when a replica starts; 0 or unset: off) starts
``tracemalloc`` with that many frames per allocation. Tracing costs CPU and memory, so it is meant for a
diagnosis run (``make soak`` with ``--trace-memory``), never for production traffic.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from collections import Counter
from typing import Any

import psutil

from serve_app.caching import live_caches

TRACE_ENV = "TRAILCAM_TRACEMALLOC_FRAMES"


class MemoryProbe:
    """RSS, live objects by type, the bounded caches' sizes and (when tracing) allocation growth by source line
    since the first report."""

    def __init__(self) -> None:
        frames = int(os.environ.get(TRACE_ENV) or 0)
        if frames > 0 and not tracemalloc.is_tracing():
            tracemalloc.start(frames)
        self._baseline: tracemalloc.Snapshot | None = None
        self._baseline_types: Counter[str] | None = None

    def report(self, *, top: int = 15) -> dict[str, Any]:
        """One sample: RSS (MiB), the types whose live count grew most since the first report, and the source
        lines whose traced allocations grew most (empty when tracing is off)."""
        gc.collect()
        types = Counter(type(o).__qualname__ for o in gc.get_objects())
        if self._baseline_types is None:
            self._baseline_types = types
        grown_types = sorted(
            ((name, n - self._baseline_types.get(name, 0)) for name, n in types.items()),
            key=lambda item: -item[1],
        )[:top]
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
            "objects": sum(types.values()),
            "frozen_objects": gc.get_freeze_count(),
            "grown_types": [{"type": name, "count_delta": delta} for name, delta in grown_types if delta > 0],
            "bounded": live_caches(),
            "traced": tracemalloc.is_tracing(),
            "grown_lines": [],
        }
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [
                    tracemalloc.Filter(False, tracemalloc.__file__),
                    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
                ]
            )
            if self._baseline is None:
                self._baseline = snapshot
            traced, _peak = tracemalloc.get_traced_memory()
            out["traced_mib"] = round(traced / 2**20, 2)
            diffs = snapshot.compare_to(self._baseline, "traceback")[:top]
            out["grown_lines"] = [
                {
                    "size_delta_kib": round(d.size_diff / 1024, 1),
                    "count_delta": d.count_diff,
                    "traceback": [f"{f.filename}:{f.lineno}" for f in d.traceback][-6:],
                }
                for d in diffs
                if d.size_diff > 0
            ]
        return out
