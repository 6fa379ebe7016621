"""API keys: create, revoke and verify. Only an HMAC of each key is stored (its SQL: serve_app/store/keys.py).

CLI: ``python -m serve_app.keys create --sites all`` (or ``--sites 1,2``) prints the new key
as the last line of its output; ``python -m serve_app.keys revoke KEY``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass, field

from serve_app.config import get_settings
from serve_app.store import keys as store_keys
from serve_app.store.db import SyncConn, connect
from serve_app.store.keys import KeyRow

KEY_PREFIX = "tcr_"
KEY_TOKEN_BYTES = 32
"""Random bytes in a key after its prefix (urlsafe base64: 43 characters)."""
STORED_PREFIX_CHARS = 8
"""Leading characters of a key kept in clear (api_keys.prefix) to find its row without its digest."""
_KEY_FORMAT = re.compile(r"tcr_[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's row id and the sites it may reach."""

    key_id: int
    all_sites: bool
    site_ids: frozenset[int] = field(default_factory=frozenset)

    def allows(self, site_id: int) -> bool:
        """Whether this key may see a site."""
        return self.all_sites or site_id in self.site_ids

    def site_filter(self) -> list[int] | None:
        """Site ids for SQL ``= ANY(%s)`` filters; None means every site."""
        return None if self.all_sites else sorted(self.site_ids)


def hash_key(key: str, *, pepper: str) -> str:
    """The stored form of a key: HMAC-SHA256 with the server's pepper, hex."""
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_TOKEN_BYTES)


def looks_like_key(token: str) -> bool:
    """Whether a token has the shape of a key; anything else is refused without asking Postgres."""
    return _KEY_FORMAT.fullmatch(token) is not None


def key_prefix(key: str) -> str:
    """The part of a key stored in clear: it finds the row, the digest comparison decides."""
    return key[:STORED_PREFIX_CHARS]


def parse_sites(text: str) -> list[int] | None:
    """``all`` -> None; ``1,2`` -> [1, 2]; anything else is an error."""
    if text.strip().lower() == "all":
        return None
    try:
        ids = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise ValueError(f"--sites must be 'all' or comma-separated site ids, got {text!r}") from exc
    if not ids or any(i <= 0 for i in ids):
        raise ValueError(f"--sites must name at least one positive site id, got {text!r}")
    return ids


def create_key(conn: SyncConn, *, sites: list[int] | None, pepper: str, label: str | None = None) -> str:
    """Store a new key for the given sites (None: all sites) and return it in clear, once."""
    if sites is not None:
        missing = store_keys.unknown_sites(conn, sites=sites)
        if missing:
            raise ValueError(f"unknown site id(s): {', '.join(map(str, missing))}")
    key = new_key()
    store_keys.insert_key(conn, key_hash=hash_key(key, pepper=pepper), prefix=key_prefix(key), sites=sites, label=label)
    return key


def revoke_key(conn: SyncConn, *, key: str, pepper: str) -> bool:
    """Revoke a key; False when no active key matches."""
    return store_keys.revoke_digest(conn, key_hash=hash_key(key, pepper=pepper))


def digests_match(stored: str, presented: str) -> bool:
    """Compare two key digests in constant time (no early exit on the first differing byte)."""
    return hmac.compare_digest(stored.encode(), presented.encode())


def find_key(conn: SyncConn, *, key: str, pepper: str) -> KeyRow | None:
    """The active api_keys row of ``key`` (found by its prefix, its digest compared in constant time), or None."""
    if not looks_like_key(key):
        return None
    rows = store_keys.keys_by_prefix(conn, prefixes=[key_prefix(key)])
    return matching_row(rows, prefix=key_prefix(key), digest=hash_key(key, pepper=pepper))


def matching_row(rows: list[KeyRow], *, prefix: str, digest: str) -> KeyRow | None:
    """The row among a prefix lookup's whose prefix is the key's and whose digest matches (constant time)."""
    return next((r for r in rows if r["prefix"] == prefix and digests_match(str(r["key_hash"]), digest)), None)


def principal_from_row(row: KeyRow) -> Principal:
    """A Principal from an api_keys row."""
    return Principal(key_id=int(row["id"]), all_sites=bool(row["all_sites"]), site_ids=frozenset(row["site_ids"] or ()))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Create or revoke API keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print it as the last line")
    create.add_argument("--sites", required=True, help="'all' or comma-separated site ids")
    create.add_argument("--label", help="a note saying whose key this is")
    revoke = sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key")
    args = parser.parse_args(argv)
    settings = get_settings()
    with connect(settings.database_dsn) as conn:
        if args.command == "create":
            try:
                sites = parse_sites(args.sites)
                key = create_key(conn, sites=sites, pepper=settings.key_pepper, label=args.label)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            scope = "all sites" if sites is None else "sites " + ",".join(map(str, sites))
            print(f"created API key for {scope} (shown once; only its hash is stored):")
            print(key)
            return 0
        if revoke_key(conn, key=args.key, pepper=settings.key_pepper):
            print("revoked")
            return 0
        print("error: no active key matches", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
