"""Webhook signatures: ``Trailcam-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`` over ``f"{t}.{body}"``.

The scheme is Stripe's: the timestamp is signed with the raw body, so a receiver that checks it against its
own clock refuses a replayed delivery, and a body changed in transit fails the HMAC. Standard library only,
so a receiver can use this module on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Trailcam-Signature"
EVENT_HEADER = "Trailcam-Event"
DEFAULT_TOLERANCE_S = 300
"""How far a signature's timestamp may be from the receiver's clock, seconds."""


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _digest(secret: str | bytes, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(_as_bytes(secret), signed, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, body: str | bytes, *, timestamp: int | None = None) -> str:
    """The ``Trailcam-Signature`` value for one delivery of ``body`` (signed now unless ``timestamp`` is given)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, _as_bytes(body))}"


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: str | bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``header`` signs exactly ``body`` (the raw bytes received) with ``secret``, at a time within
    ``tolerance_s`` of ``now`` (default: this clock). Compares in constant time; any ``v1`` may match (a
    sender rotating its secret can send two)."""
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            if timestamp is not None or not (value.isascii() and value.isdigit()):
                return False
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    clock = time.time() if now is None else now
    if abs(clock - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, _as_bytes(body))
    # Every candidate is compared (no early exit), so timing tells nothing about which one matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    return matched
