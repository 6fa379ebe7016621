"""The memory report a replica gives: RSS, objects by type, and glibc's account of the C heap."""

from __future__ import annotations

import ctypes
import platform

import pytest

from serve_app.diagnostics import MemoryProbe, malloc_heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallinfo2 is glibc's")
def test_malloc_heap_sees_memory_the_process_holds_and_frees() -> None:
    before = malloc_heap()
    assert before is not None and before["in_use"] > 0
    blocks = [ctypes.create_string_buffer(64 * 1024) for _ in range(200)]  # ~12.5 MiB below the mmap threshold
    held = malloc_heap()
    assert held is not None and held["in_use"] >= before["in_use"] + 10
    del blocks
    after = malloc_heap()
    assert after is not None and after["in_use"] <= held["in_use"] - 10


class _Held:
    """An object the collector tracks."""


def test_report_carries_rss_the_c_heap_and_grown_types() -> None:
    probe = MemoryProbe()
    first = probe.report()
    keep = [_Held() for _ in range(5000)]
    second = probe.report()
    assert second["rss_mib"] > 0 and "malloc_mib" in second
    grown = {row["type"]: row["count_delta"] for row in second["grown_types"]}
    assert grown.get("_Held", 0) >= 5000
    assert first["pid"] == second["pid"]
    del keep
