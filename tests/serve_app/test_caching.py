"""BoundedCache: the size bound pushes out the least recently used entry, entries expire after their lifetime,
and the process's live caches report their sizes."""

from __future__ import annotations

import gc

import pytest

from serve_app.caching import BoundedCache, live_caches


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_least_recently_used_entry_goes_when_the_bound_is_reached() -> None:
    cache: BoundedCache[str, int] = BoundedCache(name="lru", max_entries=3)
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert cache.get("a") == 0  # a is now the most recent; b is the oldest
    cache.put("d", 3)
    assert list(cache.keys()) == ["c", "a", "d"]
    assert cache.get("b") is None
    assert (len(cache), cache.evicted) == (3, 1)
    for i in range(1000):
        cache.put(f"k{i}", i)
    assert len(cache) == 3
    assert cache.evicted == 1001


def test_an_entry_expires_after_its_lifetime_from_the_last_put() -> None:
    clock = Clock()
    cache: BoundedCache[str, str] = BoundedCache(name="ttl", max_entries=10, ttl_s=5.0, clock=clock)
    cache.put("key", "v1")
    clock.now += 4.9
    assert cache.get("key") == "v1"
    cache.put("key", "v2")
    clock.now += 4.9
    assert cache.get("key") == "v2"
    clock.now += 0.2
    assert cache.get("key") is None
    assert "key" not in cache  # dropped when found expired


def test_pop_returns_the_value_once() -> None:
    cache: BoundedCache[int, str] = BoundedCache(name="pop", max_entries=2)
    cache.put(1, "one")
    assert cache.pop(1) == "one"
    assert cache.pop(1) is None
    assert len(cache) == 0


def test_live_caches_lists_each_cache_until_it_is_collected() -> None:
    cache: BoundedCache[int, int] = BoundedCache(name="listed-cache", max_entries=2)
    for i in range(5):
        cache.put(i, i)
    rows = [row for row in live_caches() if row["name"] == "listed-cache"]
    assert rows == [{"name": "listed-cache", "entries": 2, "max_entries": 2, "evicted": 3}]
    del cache
    gc.collect()
    assert not [row for row in live_caches() if row["name"] == "listed-cache"]


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        BoundedCache(name="none", max_entries=0)
