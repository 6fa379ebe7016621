"""The one bounded map long-lived processes keep per-entity state in: at most ``max_entries`` (the least
recently used goes first) and, when given, a lifetime per entry. A replica runs for weeks; a map keyed by
something callers choose (a token, a site, a job) must not grow with them."""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


_LIVE: weakref.WeakSet[BoundedCache[Any, Any]] = weakref.WeakSet()


def live_caches() -> list[dict[str, Any]]:
    """Every BoundedCache alive in this process: name, entries, bound, evictions (serve_app/diagnostics.py)."""
    return sorted(
        ({"name": c.name, "entries": len(c), "max_entries": c.max_entries, "evicted": c.evicted} for c in list(_LIVE)),
        key=lambda row: str(row["name"]),
    )


class BoundedCache(Generic[K, V]):
    """Least-recently-used map with a size bound and an optional time to live (seconds, from the last put)."""

    def __init__(
        self,
        *,
        name: str,
        max_entries: int,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.name = name
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self.evicted = 0
        """Entries pushed out by the size bound (diagnostics: a high count means the bound is too small)."""
        _LIVE.add(self)

    def get(self, key: K) -> V | None:
        """The live value, marked as recently used; None when absent or expired (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.ttl_s is not None and self._clock() - entry[1] >= self.ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V) -> None:
        """Store (or replace) the value; the least recently used entries go while over the bound."""
        self._entries[key] = (value, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[0]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[K]:
        return iter(list(self._entries))
