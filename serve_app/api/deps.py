"""FastAPI dependencies: the process resources and the caller's API key."""

from __future__ import annotations

import time
from typing import Annotated

import psycopg
from fastapi import Depends, Request
from psycopg.rows import dict_row

from serve_app.errors import InvalidKey, ServiceUnavailable
from serve_app.keys import LOOKUP_SQL, Principal, hash_key, principal_from_row
from serve_app.resources import Resources

_KEY_CACHE_MAX = 10_000


def get_resources(request: Request) -> Resources:
    """The resources opened in the app's lifespan."""
    resources: Resources = request.app.state.resources
    return resources


async def require_principal(request: Request, resources: Annotated[Resources, Depends(get_resources)]) -> Principal:
    """The caller's key from ``Authorization: Bearer``; 401 when missing, unknown or revoked.

    Keys are looked up by their HMAC, so no clear key is compared or logged; a verified key
    is cached for ``key_cache_s`` seconds, which bounds how long a revoked key keeps working.
    """
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidKey("missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(token.strip(), pepper=resources.settings.key_pepper)
    now = time.monotonic()
    cached = resources.key_cache.get(digest)
    if cached and cached[1] > now:
        return cached[0]
    try:
        async with resources.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = await (await cur.execute(LOOKUP_SQL, (digest,))).fetchone()
    except (psycopg.Error, TimeoutError) as exc:
        raise ServiceUnavailable("postgres", "cannot verify the API key") from exc
    if row is None:
        resources.key_cache.pop(digest, None)
        raise InvalidKey("invalid or revoked API key")
    principal = principal_from_row(row)
    if len(resources.key_cache) >= _KEY_CACHE_MAX:
        resources.key_cache.clear()
    resources.key_cache[digest] = (principal, now + resources.settings.key_cache_s)
    return principal


ResourcesDep = Annotated[Resources, Depends(get_resources)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
