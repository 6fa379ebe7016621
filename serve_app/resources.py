"""Per-process connections shared by the routers: settings, Postgres pool, Redis client."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from serve_app.config import Settings
from serve_app.keyring import KeyVerifier
from serve_app.store.db import Pool, make_pool

logger = logging.getLogger(__name__)


@dataclass
class Resources:
    """What a request handler needs; opened in the app's lifespan, closed at shutdown."""

    settings: Settings
    pool: Pool
    redis: aioredis.Redis
    keys: KeyVerifier

    @classmethod
    def create(cls, settings: Settings) -> Resources:
        """Build unopened clients for the settings."""
        # After a Redis restart every pooled connection is stale: one immediate retry on a fresh
        # connection spares the next request on each of them a 503. Only connection errors are retried
        # (a timeout is not), so a Redis that is down still answers 503 at once.
        client = aioredis.Redis.from_url(
            settings.redis_dsn,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=30,
            decode_responses=True,
            retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
        )
        pool = make_pool(settings.database_dsn, max_size=settings.db_pool_max)
        keys = KeyVerifier(
            pool, pepper=settings.key_pepper, cache_s=settings.key_cache_s, max_entries=settings.key_cache_max_entries
        )
        return cls(settings=settings, pool=pool, redis=client, keys=keys)

    async def open(self) -> None:
        """Open the Postgres pool without waiting: the app starts even while Postgres is down."""
        await self.pool.open(wait=False)

    async def close(self) -> None:
        """Close both clients (key lookups first: they use the pool)."""
        await self.keys.close()
        await self.pool.close()
        await self.redis.aclose()
