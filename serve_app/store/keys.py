"""api_keys: store, revoke and look up keys by their clear prefix (only an HMAC of each key is stored).

The key CLI's functions take its connection and commit it; the HTTP edge's lookup opens its own pooled
connection. What a key is and how its digest is compared live in serve_app/keys.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict, cast

from serve_app.store.db import Pool, SyncConn
from serve_app.store.exports import KNOWN_SITES_SQL

# Active keys by their stored prefixes; the caller compares digests (keys.digests_match) to pick the key.
LOOKUP_SQL = (
    "SELECT id, prefix, key_hash, all_sites, site_ids FROM api_keys WHERE prefix = ANY(%s) AND revoked_at IS NULL"
)
INSERT_SQL = "INSERT INTO api_keys (key_hash, prefix, all_sites, site_ids, label) VALUES (%s, %s, %s, %s, %s)"
REVOKE_SQL = "UPDATE api_keys SET revoked_at = now() WHERE key_hash = %s AND revoked_at IS NULL RETURNING id"


class KeyRow(TypedDict):
    """An active key as the lookup returns it."""

    id: int
    prefix: str
    key_hash: str
    all_sites: bool
    site_ids: list[int]


def unknown_sites(conn: SyncConn, *, sites: Sequence[int]) -> list[int]:
    """The ids among ``sites`` that name no site, sorted (read on the caller's connection)."""
    known = {int(row["id"]) for row in conn.execute(KNOWN_SITES_SQL, (list(sites),))}
    return sorted(set(sites) - known)


def insert_key(conn: SyncConn, *, key_hash: str, prefix: str, sites: list[int] | None, label: str | None) -> None:
    """Store a key's digest and prefix for ``sites`` (None: all sites) and commit the caller's connection."""
    conn.execute(INSERT_SQL, (key_hash, prefix, sites is None, sites or [], label))
    conn.commit()


def revoke_digest(conn: SyncConn, *, key_hash: str) -> bool:
    """Revoke the active key with this digest and commit the caller's connection; False when none matches."""
    row = conn.execute(REVOKE_SQL, (key_hash,)).fetchone()
    conn.commit()
    return row is not None


def keys_by_prefix(conn: SyncConn, *, prefixes: list[str]) -> list[KeyRow]:
    """Active keys whose stored prefix is one of ``prefixes`` (read on the caller's connection)."""
    return cast(list[KeyRow], conn.execute(LOOKUP_SQL, (prefixes,)).fetchall())


async def keys_by_prefix_async(pool: Pool, *, prefixes: list[str]) -> list[KeyRow]:
    """:func:`keys_by_prefix` on a connection of its own from the pool (one query for a whole lookup round)."""
    async with pool.connection() as conn:
        return cast(list[KeyRow], await (await conn.execute(LOOKUP_SQL, (prefixes,))).fetchall())
