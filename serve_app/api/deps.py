"""FastAPI dependencies: the process resources and the caller's API key."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import psycopg
from fastapi import Depends, Request
from psycopg.rows import dict_row
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.api.problems import problem_response
from serve_app.errors import InvalidKey, ServiceUnavailable
from serve_app.keys import LOOKUP_SQL, Principal, digests_match, hash_key, principal_from_row
from serve_app.resources import Resources

_KEY_CACHE_MAX = 10_000


async def get_resources(request: Request) -> Resources:
    """The resources opened in the app's lifespan (async: a plain function would cost a thread hop per request)."""
    resources: Resources = request.app.state.resources
    return resources


async def require_principal(request: Request, resources: Annotated[Resources, Depends(get_resources)]) -> Principal:
    """The caller's key from ``Authorization: Bearer``; 401 when missing, unknown or revoked.

    Keys are looked up by their HMAC, so no clear key is compared or logged; a verified key
    is cached for ``key_cache_s`` seconds, which bounds how long a revoked key keeps working.
    Concurrent requests with the same uncached key wait for one lookup instead of each taking
    a pooled connection (a burst of a new client's requests would otherwise queue on the pool).
    """
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidKey("missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(token.strip(), pepper=resources.settings.key_pepper)
    cached = resources.key_cache.get(digest)
    if cached and cached[1] > time.monotonic():
        return cached[0]
    lookup = resources.key_lookups.get(digest)
    if lookup is None:
        lookup = asyncio.ensure_future(_lookup_key(resources, digest))
        resources.key_lookups[digest] = lookup
        lookup.add_done_callback(lambda done: _lookup_done(resources, digest, done))
    # Shielded: a client that disconnects cancels its own wait, not the lookup others share.
    return await asyncio.shield(lookup)


async def _lookup_key(resources: Resources, digest: str) -> Principal:
    try:
        async with resources.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = await (await cur.execute(LOOKUP_SQL, (digest,))).fetchone()
    except (psycopg.Error, TimeoutError) as exc:
        raise ServiceUnavailable("postgres", "cannot verify the API key") from exc
    if row is None or not digests_match(str(row["key_hash"]), digest):
        resources.key_cache.pop(digest, None)
        raise InvalidKey("invalid or revoked API key")
    principal = principal_from_row(row)
    if len(resources.key_cache) >= _KEY_CACHE_MAX:
        resources.key_cache.clear()
    resources.key_cache[digest] = (principal, time.monotonic() + resources.settings.key_cache_s)
    return principal


def _lookup_done(resources: Resources, digest: str, done: asyncio.Future[Principal]) -> None:
    del resources.key_lookups[digest]
    if not done.cancelled():
        done.exception()  # retrieved here too, so a failure nobody awaited any more is not logged as lost


ResourcesDep = Annotated[Resources, Depends(get_resources)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]


class RequireBearer:
    """ASGI middleware: /api requests without ``Authorization: Bearer`` get 401 before any parsing,
    so an anonymous caller learns nothing from validation errors. The key itself is checked later."""

    def __init__(self, app: ASGIApp, *, prefix: str = "/api/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                response = problem_response(
                    401,
                    "unauthorized",
                    "missing API key: send 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                    instance=scope["path"],
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
