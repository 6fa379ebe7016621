"""Web UI sign-in: a server-side session in Redis behind a signed, HttpOnly, SameSite=Strict cookie.

The API key a person signs in with never reaches the browser again: Redis keeps it sealed (AES-GCM under a key
derived from ``ui_session_secret``) with the session's CSRF token; the cookie holds only the session id and its
HMAC. Every page request verifies the key again (the API's own cache), so a revoked key ends its sessions.
Sign-out deletes the Redis record; a session also ends after ``ui_session_ttl_s``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

COOKIE_NAME = "trailcam_ui"
LOGIN_COOKIE_NAME = "trailcam_ui_login"
SESSION_PREFIX = "trailcam:ui:session:"
LOGIN_TOKEN_TTL_S = 3600
EXPORTS_KEPT = 50
"""Most export jobs a session lists (the newest)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    """A signed-in person: the session id, the API key it acts with, and the token its forms carry."""

    id: str
    api_key: str
    csrf: str


class Sessions:
    """Creates, reads and ends sessions; signs cookies and login forms with the configured secret."""

    def __init__(self, client: aioredis.Redis, *, secret: str, ttl_s: int) -> None:
        self._redis = client
        self._mac_key = hashlib.sha256(b"trailcam-ui-mac\x00" + secret.encode()).digest()
        self._seal = AESGCM(hashlib.sha256(b"trailcam-ui-seal\x00" + secret.encode()).digest())
        self.ttl_s = ttl_s

    def _mac(self, purpose: str, value: str) -> str:
        return _b64(hmac.new(self._mac_key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest())

    def cookie_value(self, session_id: str) -> str:
        """What the cookie carries: the id and its signature."""
        return f"{session_id}.{self._mac('session', session_id)}"

    def session_id(self, cookie: str | None) -> str | None:
        """The id of a cookie whose signature checks; None for a missing or forged one."""
        if not cookie or "." not in cookie:
            return None
        session_id, _, mac = cookie.partition(".")
        return session_id if _same(mac, self._mac("session", session_id)) else None

    def login_token(self, browser_nonce: str, now: float | None = None) -> str:
        """The token the sign-in form carries (there is no session yet to hold one): bound to the nonce in the
        browser's sign-in cookie, so a form posted from another site (which has no such cookie) is refused."""
        stamp = str(int(now if now is not None else time.time()))
        return f"{stamp}.{self._mac('login', f'{browser_nonce}.{stamp}')}"

    def login_token_valid(self, token: str | None, browser_nonce: str | None, now: float | None = None) -> bool:
        """True for a token this app issued within the last hour to the browser holding ``browser_nonce``."""
        if not token or not browser_nonce or "." not in token:
            return False
        stamp, _, mac = token.partition(".")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            return False
        if not _same(mac, self._mac("login", f"{browser_nonce}.{stamp}")):
            return False
        return 0 <= (now if now is not None else time.time()) - int(stamp) <= LOGIN_TOKEN_TTL_S

    async def create(self, api_key: str) -> Session:
        """A new session for a key the caller has verified."""
        session_id, csrf = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        nonce = os.urandom(12)
        sealed = _b64(nonce + self._seal.encrypt(nonce, api_key.encode(), session_id.encode()))
        key = _record_key(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:  # never a record without its expiry
            pipe.hset(key, mapping={"key": sealed, "csrf": csrf, "created": str(int(time.time()))})
            pipe.expire(key, self.ttl_s)
            await pipe.execute()
        return Session(session_id, api_key, csrf)

    async def load(self, cookie: str | None) -> Session | None:
        """The session a cookie names, when it is signed, still in Redis and its key unseals."""
        session_id = self.session_id(cookie)
        if session_id is None:
            return None
        fields = await self._redis.hgetall(_record_key(session_id))
        if not fields:
            return None
        try:
            raw = _unb64(_text(fields["key"]))
            api_key = self._seal.decrypt(raw[:12], raw[12:], session_id.encode()).decode()
        except Exception:  # noqa: BLE001 - a record sealed under another secret is no session
            return None
        return Session(session_id, api_key, _text(fields["csrf"]))

    async def end(self, session_id: str) -> None:
        """Sign out: the record and what it listed go."""
        await self._redis.delete(_record_key(session_id), _exports_key(session_id))

    async def remember_export(self, session_id: str, job_id: str) -> None:
        """Add an export job to the session's list (newest first, bounded)."""
        key = _exports_key(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, job_id)
            pipe.ltrim(key, 0, EXPORTS_KEPT - 1)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def forget_export(self, session_id: str, job_id: str) -> None:
        """Drop a job the API no longer knows from the session's list."""
        await self._redis.lrem(_exports_key(session_id), 0, job_id)

    async def exports(self, session_id: str) -> list[str]:
        """The session's export job ids, newest first."""
        return [_text(v) for v in await self._redis.lrange(_exports_key(session_id), 0, -1)]

    def csrf_valid(self, session: Session, token: str | None) -> bool:
        """True when a form's token is its session's."""
        return bool(token) and _same(str(token), session.csrf)


def _record_key(session_id: str) -> str:
    """The Redis hash of a session: its sealed key and CSRF token."""
    return SESSION_PREFIX + session_id


def _exports_key(session_id: str) -> str:
    """The Redis list of the export jobs a session started."""
    return SESSION_PREFIX + session_id + ":exports"


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of a value from the browser (any text) with one this app made."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def new_browser_nonce() -> str:
    """The value of the sign-in cookie a login token is bound to."""
    return secrets.token_urlsafe(16)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
