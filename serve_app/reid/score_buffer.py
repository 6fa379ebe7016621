"""An async bounded buffer that writes score rows with binary COPY by size or time, never blocking callers.

Identification only calls :meth:`ScoreBuffer.add`, which never waits and never raises. Background writers
flush (``writers`` of them, each with its own connection, so one COPY's index work overlaps another's);
when Postgres is slow or down the rows stay buffered and are retried with backoff; rows beyond
``max_buffered_rows`` (in flight included) are dropped and counted (``on_dropped``), never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from serve_app.reid.scores import ScoreRow, copy_scores_async

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3
RETRY_BACKOFF_MAX_S = 5.0


@dataclass(frozen=True)
class BufferLimits:
    """Flush when ``flush_rows`` are buffered or ``flush_interval_s`` passed; keep at most ``max_buffered_rows``.

    ``writers`` COPYs of up to ``flush_rows`` rows each run at once, on their own connections.
    """

    max_buffered_rows: int = 200_000
    flush_rows: int = 5_000
    flush_interval_s: float = 0.5
    write_timeout_s: float = 10.0
    writers: int = 2


@dataclass
class BufferStats:
    """Counters since start (also exported as metrics by the deployment)."""

    written: int = 0
    dropped: int = 0
    failed_flushes: int = 0
    last_error: str | None = None


class ScoreBuffer:
    """Buffers ScoreRows and COPYs them on its own connection to ``dsn``."""

    def __init__(
        self,
        dsn: str,
        *,
        limits: BufferLimits | None = None,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.limits = limits or BufferLimits()
        self.stats = BufferStats()
        self._rows: deque[ScoreRow] = deque()
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: dict[int, psycopg.AsyncConnection[Any]] = {}
        self._closing = False

    @property
    def pending(self) -> int:
        """Rows not yet written: buffered plus those in a COPY now."""
        return len(self._rows) + self._in_flight

    def start(self) -> None:
        """Start the writers on the running event loop."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._run(writer), name=f"score-buffer-{writer}")
                for writer in range(max(1, self.limits.writers))
            ]

    def add(self, rows: Sequence[ScoreRow]) -> int:
        """Queue rows without waiting; returns how many were dropped because the buffer is full."""
        room = max(0, self.limits.max_buffered_rows - self.pending)
        accepted = rows[:room]
        self._rows.extend(accepted)
        dropped = len(rows) - len(accepted)
        if dropped:
            self._count_dropped(dropped, reason="buffer full")
        if len(self._rows) >= self.limits.flush_rows:
            self._wake.set()
        return dropped

    def record_written(self, n: int) -> None:
        """Count rows written elsewhere (inline with their detections) as written by the log."""
        self.stats.written += n
        if self._on_written:
            self._on_written(n)

    def _count_dropped(self, n: int, *, reason: str) -> None:
        self.stats.dropped += n
        logger.warning("dropped %d score rows (%s); %d dropped so far", n, reason, self.stats.dropped)
        if self._on_dropped:
            self._on_dropped(n)

    async def _connection(self, writer: int) -> psycopg.AsyncConnection[Any]:
        conn = self._conns.get(writer)
        if conn is None or conn.closed:
            conn = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=CONNECT_TIMEOUT_S)
            self._conns[writer] = conn
        return conn

    async def _discard_connection(self, writer: int) -> None:
        conn = self._conns.pop(writer, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=1.0)

    async def _write(self, writer: int, chunk: list[ScoreRow]) -> None:
        conn = await self._connection(writer)
        async with conn.transaction():
            await copy_scores_async(conn, chunk)

    async def flush_once(self, writer: int = 0) -> int:
        """Write up to ``flush_rows`` buffered rows; returns rows written (0 on failure, rows kept)."""
        if not self._rows:
            return 0
        chunk = [self._rows.popleft() for _ in range(min(len(self._rows), self.limits.flush_rows))]
        self._in_flight += len(chunk)
        try:
            await asyncio.wait_for(self._write(writer, chunk), timeout=self.limits.write_timeout_s)
        except (psycopg.IntegrityError, psycopg.DataError) as exc:
            # A row the database refuses (e.g. its detection was deleted) would block the queue forever.
            self._in_flight -= len(chunk)
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            self._count_dropped(len(chunk), reason=f"refused by Postgres: {type(exc).__name__}")
            return 0
        except BaseException as exc:
            # Kept for the next attempt, at the front (cancelled at shutdown too: close() writes or counts them).
            self._in_flight -= len(chunk)
            self._rows.extendleft(reversed(chunk))
            if not isinstance(exc, (psycopg.Error, OSError, TimeoutError)):
                raise
            self.stats.failed_flushes += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
            logger.warning("score flush of %d rows failed, will retry: %s", len(chunk), self.stats.last_error)
            await self._discard_connection(writer)
            return 0
        self._in_flight -= len(chunk)
        self.stats.written += len(chunk)
        if self._on_written:
            self._on_written(len(chunk))
        logger.debug("wrote %d score rows", len(chunk))
        return len(chunk)

    async def _run(self, writer: int) -> None:
        backoff_s = 0.0
        while not self._closing:
            if backoff_s:
                await asyncio.sleep(backoff_s)
            elif len(self._rows) < self.limits.flush_rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.limits.flush_interval_s)
            self._wake.clear()
            if not self._rows:
                continue
            written = await self.flush_once(writer)
            if written or not self._rows:
                backoff_s = 0.0
            else:
                backoff_s = min(RETRY_BACKOFF_MAX_S, max(0.2, backoff_s * 2))

    async def close(self, *, timeout_s: float = 5.0) -> None:
        """Stop the writers after a last attempt to write what is buffered; count what is left as dropped."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for writer in list(self._conns):  # a cancelled COPY leaves its connection mid-statement
            await self._discard_connection(writer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._rows and loop.time() < deadline:
            if not await self.flush_once():
                break
        if self._rows:
            self._count_dropped(len(self._rows), reason="shutdown with Postgres unreachable")
            self._rows.clear()
        for writer in list(self._conns):
            await self._discard_connection(writer)
