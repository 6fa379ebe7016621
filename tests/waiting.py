"""Waiting for a condition with a deadline instead of sleeping a fixed time and hoping it held."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import psycopg

T = TypeVar("T")


def wait_until(probe: Callable[[], T], *, what: str, timeout_s: float = 30.0, every_s: float = 0.05) -> T:
    """Call ``probe`` until it returns something truthy and return that; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (result := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {result!r})")
        time.sleep(every_s)
    return result


async def wait_until_async(
    probe: Callable[[], T | Awaitable[T]], *, what: str, timeout_s: float = 30.0, every_s: float = 0.02
) -> T:
    """The same on a running event loop (which keeps running the code under test); ``probe`` may be async."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return cast(T, result)
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {result!r})")
        await asyncio.sleep(every_s)


LOCK_WAITERS_SQL = (
    "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


def sessions_waiting_on_locks(db: psycopg.Connection[Any]) -> int:
    """How many sessions of this database wait on a lock now (a blocked statement's observable state)."""
    row = db.execute(LOCK_WAITERS_SQL).fetchone()
    assert row is not None
    return int(row["n"])
