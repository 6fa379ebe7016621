"""The model registry's queries: ``model_versions`` (one row per re-ID model version, from its card) and
``model_promotions`` (each time a version became active). ``python -m batch.models`` writes them;
``GET /api/models`` reads them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb

from serve_app.errors import ModelRefused, ServiceUnavailable
from serve_app.store.db import Pool, Row, SyncConn

Status = Literal["candidate", "active", "retired"]
Action = Literal["promote", "rollback"]
STATUSES: tuple[Status, ...] = ("candidate", "active", "retired")

# One advisory lock id: one promote or rollback at a time, from any machine.
_LOCK_ID = 0x7472_6169_6D6F

VERSION_COLUMNS = """
v.version, v.status, v.architecture, v.input_size_px, v.embedding_dim, v.weights_path, v.weights_sha256,
v.parent_version, v.run, v.training_data, v.epochs, v.validation, v.top1_known, v.recommended_accept,
v.recommended_review, v.created_at, v.registered_at,
(SELECT max(p.at) FROM model_promotions p WHERE p.version = v.version) AS promoted_at
"""
# Active first, then the newest.
LIST_SQL = f"SELECT {VERSION_COLUMNS} FROM model_versions v ORDER BY v.status = 'active' DESC, v.created_at DESC"
GET_SQL = f"SELECT {VERSION_COLUMNS}, v.card FROM model_versions v WHERE v.version = %s"
ACTIVE_SQL = f"SELECT {VERSION_COLUMNS} FROM model_versions v WHERE v.status = 'active'"
HISTORY_SQL = """
SELECT id, version, previous_version, action, actor, at, accept_threshold, review_threshold
FROM model_promotions WHERE %(version)s::text IS NULL OR version = %(version)s OR previous_version = %(version)s
ORDER BY id
"""
INSERT_SQL = """
INSERT INTO model_versions (version, architecture, input_size_px, embedding_dim, weights_path, weights_sha256,
    parent_version, run, training_data, epochs, validation, top1_known, recommended_accept, recommended_review,
    card, created_at, status)
VALUES (%(version)s, %(architecture)s, %(input_size_px)s, %(embedding_dim)s, %(weights_path)s,
    %(weights_sha256)s, %(parent_version)s, %(run)s, %(training_data)s, %(epochs)s, %(validation)s,
    %(top1_known)s, %(recommended_accept)s, %(recommended_review)s, %(card)s, %(created_at)s, 'candidate')
ON CONFLICT (version) DO NOTHING
"""
# A registered version's card may be registered again (its file moved, a figure added); its weights may not.
UPDATE_SQL = """
UPDATE model_versions SET weights_path = %(weights_path)s, embedding_dim = %(embedding_dim)s,
    parent_version = %(parent_version)s, run = %(run)s, training_data = %(training_data)s, epochs = %(epochs)s,
    validation = %(validation)s, top1_known = %(top1_known)s, recommended_accept = %(recommended_accept)s,
    recommended_review = %(recommended_review)s, card = %(card)s, created_at = %(created_at)s
WHERE version = %(version)s
"""
RETIRE_ACTIVE_SQL = "UPDATE model_versions SET status = 'retired' WHERE status = 'active' RETURNING version"
ACTIVATE_SQL = "UPDATE model_versions SET status = 'active' WHERE version = %s"
INSERT_PROMOTION_SQL = """
INSERT INTO model_promotions (version, previous_version, action, actor, accept_threshold, review_threshold)
VALUES (%s, %s, %s, %s, %s, %s)
RETURNING id, version, previous_version, action, actor, at, accept_threshold, review_threshold
"""


@dataclass(frozen=True)
class VersionRecord:
    """A model version as its card describes it (what ``register`` stores)."""

    version: str
    architecture: str
    input_size_px: int
    weights_path: str
    weights_sha256: str
    created_at: datetime
    card: dict[str, Any]
    embedding_dim: int | None = None
    parent_version: str | None = None
    run: str | None = None
    training_data: dict[str, Any] | None = None
    epochs: int | None = None
    validation: dict[str, Any] | None = None
    top1_known: float | None = None
    recommended_accept: float | None = None
    recommended_review: float | None = None

    def params(self) -> dict[str, Any]:
        """The record as query parameters (JSON columns wrapped)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("training_data", "validation", "card"):
            out[key] = Jsonb(out[key] or {})
        return out


def register(conn: SyncConn, *, record: VersionRecord) -> bool:
    """Insert a version, or update the card of one already registered with the same weights; the caller commits.

    Returns True when the version is new. ModelRefused when the version is registered with other weights."""
    inserted = conn.execute(INSERT_SQL, record.params()).rowcount == 1
    if inserted:
        return True
    row = conn.execute("SELECT weights_sha256 FROM model_versions WHERE version = %s", (record.version,)).fetchone()
    assert row is not None  # the insert conflicted on it
    if row["weights_sha256"] != record.weights_sha256:
        raise ModelRefused(
            f"{record.version} is registered with weights SHA-256 {row['weights_sha256']}, the card says"
            f" {record.weights_sha256}: a version's weights never change"
        )
    conn.execute(UPDATE_SQL, record.params())
    return False


def get_version(conn: SyncConn, version: str) -> Row | None:
    """One version with its card, or None."""
    return conn.execute(GET_SQL, (version,)).fetchone()


def list_versions(conn: SyncConn) -> list[Row]:
    """Every version, the active one first, then the newest."""
    return conn.execute(LIST_SQL).fetchall()


def active_version(conn: SyncConn) -> Row | None:
    """The active version, or None."""
    return conn.execute(ACTIVE_SQL).fetchone()


def history(conn: SyncConn, *, version: str | None = None) -> list[Row]:
    """Promotions and rollbacks in the order they happened (only those naming ``version`` when given)."""
    return conn.execute(HISTORY_SQL, {"version": version}).fetchall()


def record_activation(
    conn: SyncConn,
    *,
    version: str,
    action: Action,
    actor: str,
    accept_threshold: float | None,
    review_threshold: float | None,
) -> Row:
    """Mark ``version`` active and the active one retired, and record it, in one transaction (commits).

    Returns the history row with ``previous_version``."""
    with conn.transaction():
        retired = conn.execute(RETIRE_ACTIVE_SQL).fetchone()
        previous = retired["version"] if retired else None
        if conn.execute(ACTIVATE_SQL, (version,)).rowcount != 1:
            raise ModelRefused(f"unknown model version {version!r}")
        row = conn.execute(
            INSERT_PROMOTION_SQL, (version, previous, action, actor, accept_threshold, review_threshold)
        ).fetchone()
    assert row is not None  # INSERT ... RETURNING returns its row
    return row


@contextmanager
def changing_models(conn: SyncConn) -> Iterator[None]:
    """Hold the lock every change of the running app's model or thresholds takes (promote, rollback, the guarded
    threshold apply), on an autocommit connection; ModelRefused when another change holds it."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s) AS got", (_LOCK_ID,)).fetchone()
    if not row or not row["got"]:
        raise ModelRefused(
            "another change of the running model or thresholds (promote, rollback, threshold apply) is running;"
            " try again when it has finished"
        )
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))


async def list_models(pool: Pool) -> list[Row]:
    """Every version (``GET /api/models``); ServiceUnavailable when Postgres cannot answer."""
    try:
        async with pool.connection() as conn:
            cur = await conn.execute(LIST_SQL)
            return await cur.fetchall()
    except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
        raise ServiceUnavailable("postgres", "cannot read model versions") from exc


async def get_model(pool: Pool, version: str) -> tuple[Row | None, list[Row]]:
    """One version with its card and the promotions naming it; (None, []) when unknown."""
    try:
        async with pool.connection() as conn:
            found = await (await conn.execute(GET_SQL, (version,))).fetchone()
            if found is None:
                return None, []
            events = await (await conn.execute(HISTORY_SQL, {"version": version})).fetchall()
    except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
        raise ServiceUnavailable("postgres", "cannot read model versions") from exc
    return found, events
