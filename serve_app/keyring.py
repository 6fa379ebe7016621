"""API-key verification for the HTTP edge: rows found by prefix, digests compared in constant time, and
lookups batched so that a flood of invalid tokens holds at most one pooled connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg

from serve_app.caching import BoundedCache
from serve_app.errors import InvalidKey, ServiceUnavailable
from serve_app.keys import (
    Principal,
    hash_key,
    key_prefix,
    looks_like_key,
    matching_row,
    principal_from_row,
)
from serve_app.store.db import Pool
from serve_app.store.keys import KeyRow, keys_by_prefix_async

logger = logging.getLogger(__name__)

REFUSED_CACHE_S = 30.0
"""How long a refused token answers 401 without a query, seconds. Safe: a token only becomes valid by being
created, and a new key is 256 random bits nobody has sent before; revocation is never delayed by it."""

_REFUSED = "invalid or revoked API key"


class KeyVerifier:
    """Turns a bearer token into a Principal.

    Tokens that cannot be keys are refused at once. Others wait for the next lookup round: one query
    (``prefix = ANY(...)``) for every token that arrived while the previous round ran, so concurrent
    requests with one key share a lookup and a burst of random tokens costs a few queries on one
    connection, never the pool. Verified keys are cached ``cache_s`` seconds (bounds revocation delay), refused
    tokens REFUSED_CACHE_S; each cache holds at most ``max_entries`` (Settings.key_cache_max_entries), the least
    recently used going first.
    """

    def __init__(self, pool: Pool, *, pepper: str, cache_s: float, max_entries: int) -> None:
        self.pool = pool
        self.pepper = pepper
        self.cache_s = cache_s
        self.queries = 0
        """Lookup queries sent to Postgres (diagnostics)."""
        self.waiting = 0
        """Requests now waiting for a lookup round (diagnostics)."""
        self.valid: BoundedCache[str, Principal] = BoundedCache(
            name="api keys verified", max_entries=max_entries, ttl_s=cache_s
        )
        self.refused: BoundedCache[str, bool] = BoundedCache(
            name="api keys refused", max_entries=max_entries, ttl_s=REFUSED_CACHE_S
        )
        self._next: dict[str, tuple[str, asyncio.Future[Principal | None]]] = {}
        self._running: dict[str, asyncio.Future[Principal | None]] = {}
        self._rounds: asyncio.Task[None] | None = None

    async def verify(self, token: str) -> Principal:
        """The key's principal; InvalidKey when it is malformed, unknown or revoked; ServiceUnavailable
        when Postgres cannot answer."""
        if not looks_like_key(token):
            raise InvalidKey(_REFUSED)
        digest = hash_key(token, pepper=self.pepper)
        valid = self.valid.get(digest)
        if valid is not None:
            return valid
        if self.refused.get(digest):
            raise InvalidKey(_REFUSED)
        future = self._running.get(digest) or self._queued(digest, key_prefix(token))
        self.waiting += 1
        try:
            # Shielded: a client that disconnects cancels its own wait, not the lookup others share.
            principal = await asyncio.shield(future)
        finally:
            self.waiting -= 1
        if principal is None:
            raise InvalidKey(_REFUSED)
        return principal

    def _queued(self, digest: str, prefix: str) -> asyncio.Future[Principal | None]:
        queued = self._next.get(digest)
        if queued is not None:
            return queued[1]
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._next[digest] = (prefix, future)
        if self._rounds is None:
            self._rounds = asyncio.ensure_future(self._run_rounds())
        return future

    async def _run_rounds(self) -> None:
        batch: dict[str, tuple[str, asyncio.Future[Principal | None]]] = {}
        try:
            while self._next:
                batch, self._next = self._next, {}
                self._running = {digest: future for digest, (_, future) in batch.items()}
                try:
                    rows = await self._fetch(sorted({prefix for prefix, _ in batch.values()}))
                except (psycopg.Error, TimeoutError) as exc:
                    logger.warning("cannot verify API keys: %s", type(exc).__name__)
                    for _, future in batch.values():
                        _settle(future, error=ServiceUnavailable("postgres", "cannot verify the API key"))
                    continue
                finally:
                    self._running = {}
                self._answer(batch, rows)
        finally:
            self._rounds = None
            for _, future in [*batch.values(), *self._next.values()]:
                _settle(future, error=ServiceUnavailable("postgres", "cannot verify the API key"))
            self._next = {}

    async def _fetch(self, prefixes: list[str]) -> list[KeyRow]:
        self.queries += 1
        return await keys_by_prefix_async(self.pool, prefixes=prefixes)

    def _answer(self, batch: dict[str, tuple[str, asyncio.Future[Principal | None]]], rows: list[KeyRow]) -> None:
        for digest, (prefix, future) in batch.items():
            row = matching_row(rows, prefix=prefix, digest=digest)
            principal = principal_from_row(row) if row is not None else None
            if principal is None:
                self.refused.put(digest, True)
            elif self.cache_s > 0:
                self.valid.put(digest, principal)
            _settle(future, result=principal)

    async def close(self) -> None:
        """Stop the lookup rounds (waiting requests get 503)."""
        if self._rounds is not None:
            self._rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rounds


def _settle(
    future: asyncio.Future[Principal | None], *, result: Principal | None = None, error: Exception | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _retrieve(future: asyncio.Future[Principal | None]) -> None:
    # A failure nobody awaits any more (every waiter disconnected) is not logged as lost.
    if not future.cancelled():
        future.exception()
