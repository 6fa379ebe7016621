"""Memory diagnostics of a long-lived process: what it holds and what grew, for the soak and for operators.

``TRAILCAM_TRACEMALLOC_FRAMES`` (an integer, read when a replica starts; 0 or unset: off) starts
``tracemalloc`` with that many frames per allocation. Tracing costs CPU and memory, so it is meant for a
diagnosis run (``make soak`` with ``--trace-memory``), never for production traffic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import tracemalloc
from collections import Counter
from typing import Any

import psutil

from serve_app.caching import live_caches

TRACE_ENV = "TRAILCAM_TRACEMALLOC_FRAMES"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_heap() -> dict[str, float] | None:
    """glibc's own account of the C heap (``mallinfo2``), in MiB: ``in_use`` is what native code holds,
    ``free`` is what malloc keeps for reuse without returning it to the system, ``mmapped`` the large
    blocks it maps directly. RSS rising while ``in_use`` stays flat is fragmentation, not a leak.
    None where the C library has no ``mallinfo2`` (not glibc, or glibc before 2.33)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    mib = 2**20
    return {
        "in_use": round(info.uordblks / mib, 1),
        "free": round(info.fordblks / mib, 1),
        "mmapped": round(info.hblkhd / mib, 1),
        "arena": round(info.arena / mib, 1),
    }


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
            "malloc_mib": malloc_heap(),
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
