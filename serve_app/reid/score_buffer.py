"""An async bounded buffer that writes score rows with binary COPY by size or time, never blocking callers.

Identification only calls :meth:`ScoreBuffer.add`, which never waits and never raises. Background writers
flush (``writers`` of them, each with its own connection, so one COPY's index work overlaps another's);
when Postgres is slow or down the rows stay buffered and are retried with backoff; rows beyond
``max_buffered_rows`` (in flight included) are dropped and counted (``on_dropped``), never silently.

Each chunk is written under an id recorded in ``score_log_chunks`` in the same transaction, and a failed
chunk is retried whole under the same id: when a COMMIT landed but its answer was lost (connection, write
timeout, shutdown), the retry finds the id and writes nothing again. Rows whose detection or deer was deleted
are dropped and counted; the rest of their chunk is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors

from serve_app.reid.scores import (
    ScoreRow,
    claim_chunk,
    copy_scores_async,
    prune_chunks,
    rows_with_live_references,
)
from serve_app.store.db import CONNECT_TIMEOUT_S

logger = logging.getLogger(__name__)

RETRY_BACKOFF_MAX_S = 5.0
PRUNE_INTERVAL_S = 600.0
"""Seconds between a writer's prunes of chunk ids past their retention."""


@dataclass(frozen=True)
class BufferLimits:
    """Flush when ``flush_rows`` are buffered or ``flush_interval_s`` passed; keep at most ``max_buffered_rows``.

    ``writers`` COPYs of up to ``flush_rows`` rows each run at once, on their own connections. Written chunk
    ids are kept ``chunk_id_retention_s`` seconds; a chunk whose commit went unanswered and that cannot be
    retried within half of that is dropped and counted rather than risk writing it twice.
    """

    max_buffered_rows: int = 200_000
    flush_rows: int = 5_000
    flush_interval_s: float = 0.5
    write_timeout_s: float = 10.0
    writers: int = 2
    chunk_id_retention_s: float = 86_400.0


@dataclass
class BufferStats:
    """Counters since start (also exported as metrics by the deployment); drops by reason."""

    written: int = 0
    dropped: int = 0
    failed_flushes: int = 0
    last_error: str | None = None
    dropped_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class _Chunk:
    """Rows written in one transaction under one id, kept together across retries."""

    rows: list[ScoreRow]
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    claimed_at: float | None = None  # loop time of the first attempt that may have committed
    check_references: bool = False  # a reference was refused: write only rows whose references exist


class ScoreBuffer:
    """Buffers ScoreRows and COPYs them on its own connections to ``dsn``."""

    def __init__(
        self,
        dsn: str,
        *,
        limits: BufferLimits | None = None,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[int, str], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.limits = limits or BufferLimits()
        self.stats = BufferStats()
        self._rows: deque[ScoreRow] = deque()
        self._retry: deque[_Chunk] = deque()
        self._retry_rows = 0
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: dict[int, psycopg.AsyncConnection[Any]] = {}
        self._pruned_at = float("-inf")
        self._closing = False

    @property
    def pending(self) -> int:
        """Rows not yet written: buffered, waiting for a retry, or in a COPY now."""
        return self._queued + self._in_flight

    @property
    def _queued(self) -> int:
        return len(self._rows) + self._retry_rows

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
            self._count_dropped(dropped, reason="buffer_full")
        if len(self._rows) >= self.limits.flush_rows:
            self._wake.set()
        return dropped

    def record_written(self, n: int) -> None:
        """Count rows written elsewhere (inline with their detections) as written by the log."""
        if n <= 0:  # callbacks (Ray counters) take positive increments only
            return
        self.stats.written += n
        if self._on_written:
            self._on_written(n)

    def _count_dropped(self, n: int, *, reason: str) -> None:
        if not n:
            return
        self.stats.dropped += n
        self.stats.dropped_by_reason[reason] = self.stats.dropped_by_reason.get(reason, 0) + n
        logger.warning("dropped %d score rows (%s); %d dropped so far", n, reason, self.stats.dropped)
        if self._on_dropped:
            self._on_dropped(n, reason)

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

    async def _write(self, writer: int, chunk: _Chunk) -> tuple[int, int]:
        """Write the chunk in one transaction under its id; returns (rows written, rows whose references are gone)."""
        conn = await self._connection(writer)
        async with conn.transaction():
            rows = chunk.rows
            if chunk.check_references:
                rows = await rows_with_live_references(conn, rows)
                if not rows:
                    return 0, len(chunk.rows)
            if chunk.claimed_at is None:
                chunk.claimed_at = asyncio.get_running_loop().time()
            earlier = await claim_chunk(conn, chunk_id=chunk.id, rows=len(rows))
            if earlier is not None:
                logger.info("score chunk %s was committed by an earlier attempt; not written again", chunk.id)
                return earlier, len(chunk.rows) - earlier
            await copy_scores_async(conn, rows)
        return len(rows), len(chunk.rows) - len(rows)

    def _next_chunk(self) -> _Chunk | None:
        if self._retry:
            chunk = self._retry.popleft()
            self._retry_rows -= len(chunk.rows)
            return chunk
        if not self._rows:
            return None
        return _Chunk([self._rows.popleft() for _ in range(min(len(self._rows), self.limits.flush_rows))])

    def _requeue(self, *chunks: _Chunk) -> None:
        """Put chunks back at the front, in order, for the next attempt."""
        for chunk in reversed(chunks):
            self._retry.appendleft(chunk)
            self._retry_rows += len(chunk.rows)

    async def flush_once(self, writer: int = 0) -> int:
        """Write one chunk (retries first); returns rows written (0 on failure, rows kept for a retry)."""
        written, _settled = await self._flush(writer)
        return written

    async def _flush(self, writer: int) -> tuple[int, bool]:
        """Write one chunk; returns (rows written, whether the chunk is settled: written or dropped)."""
        chunk = self._next_chunk()
        if chunk is None:
            return 0, True
        loop = asyncio.get_running_loop()
        if chunk.claimed_at is not None and loop.time() - chunk.claimed_at > self.limits.chunk_id_retention_s / 2:
            self._count_dropped(len(chunk.rows), reason="outcome_unknown")
            return 0, True
        self._in_flight += len(chunk.rows)
        try:
            try:
                written, orphaned = await asyncio.wait_for(
                    self._write(writer, chunk), timeout=self.limits.write_timeout_s
                )
            except errors.ForeignKeyViolation:
                if chunk.check_references:
                    raise
                # A detection or deer was deleted: write the rows whose references still exist.
                chunk.check_references = True
                written, orphaned = await asyncio.wait_for(
                    self._write(writer, chunk), timeout=self.limits.write_timeout_s
                )
        except (psycopg.IntegrityError, psycopg.DataError) as exc:
            self._in_flight -= len(chunk.rows)
            self._refused(chunk, exc)
            return 0, True
        except BaseException as exc:
            # Kept whole under its id for the next attempt (cancelled at shutdown too: close() writes or counts it).
            self._in_flight -= len(chunk.rows)
            self._requeue(chunk)
            if not isinstance(exc, (psycopg.Error, OSError, TimeoutError)):
                raise
            self.stats.failed_flushes += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
            logger.warning("score flush of %d rows failed, will retry: %s", len(chunk.rows), self.stats.last_error)
            await self._discard_connection(writer)
            return 0, False
        self._in_flight -= len(chunk.rows)
        self._count_dropped(orphaned, reason="reference_missing")
        self.record_written(written)
        logger.debug("wrote %d score rows", written)
        await self._prune_if_due(writer)
        return written, True

    def _refused(self, chunk: _Chunk, exc: psycopg.Error) -> None:
        """Postgres refused a row: split the chunk until the refused rows stand alone, and drop only those."""
        self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if len(chunk.rows) == 1:
            self._count_dropped(1, reason="refused")
            return
        half = len(chunk.rows) // 2
        # The refused transaction committed nothing under the chunk's id, so the halves take new ones.
        self._requeue(
            _Chunk(chunk.rows[:half], check_references=chunk.check_references),
            _Chunk(chunk.rows[half:], check_references=chunk.check_references),
        )

    async def _prune_if_due(self, writer: int) -> None:
        """Forget chunk ids past their retention, at most every PRUNE_INTERVAL_S per buffer."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._pruned_at < PRUNE_INTERVAL_S:
            return
        self._pruned_at = loop.time()
        try:
            conn = await self._connection(writer)
            async with conn.transaction():
                pruned = await asyncio.wait_for(
                    prune_chunks(conn, older_than_s=self.limits.chunk_id_retention_s),
                    timeout=self.limits.write_timeout_s,
                )
        except (psycopg.Error, OSError, TimeoutError) as exc:
            logger.warning("pruning score chunk ids failed, will try again later: %s", exc)
            await self._discard_connection(writer)
            return
        logger.debug("pruned %d score chunk ids", pruned)

    async def _run(self, writer: int) -> None:
        backoff_s = 0.0
        while not self._closing:
            if backoff_s:
                await asyncio.sleep(backoff_s)
            elif not self._retry and len(self._rows) < self.limits.flush_rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.limits.flush_interval_s)
            self._wake.clear()
            if not self._queued:
                continue
            try:
                _written, settled = await self._flush(writer)
            except Exception:  # a writer that died would leave its rows pending for good
                logger.exception("score writer %d failed; it goes on after a pause", writer)
                settled = False
            backoff_s = 0.0 if settled else min(RETRY_BACKOFF_MAX_S, max(0.2, backoff_s * 2))

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
        while self._queued and loop.time() < deadline:
            _written, settled = await self._flush(0)
            if not settled:
                break
        if self._queued:
            self._count_dropped(self._queued, reason="shutdown")
            self._rows.clear()
            self._retry.clear()
            self._retry_rows = 0
        for writer in list(self._conns):
            await self._discard_connection(writer)
