"""Postgres connections: one async pool per process, sync connections for CLIs and batch."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

logger = logging.getLogger(__name__)

Row = dict[str, Any]
"""A row as every connection here returns it (``dict_row``)."""
SyncConn = psycopg.Connection[Row]
"""A synchronous connection (CLIs, migrations, batch tasks): the type store functions for batch jobs take."""
AsyncConn = psycopg.AsyncConnection[Row]
"""A pooled async connection (the ingress): the type async store functions take."""
Pool = AsyncConnectionPool[AsyncConn]
"""The ingress's pool of :data:`AsyncConn`: the type store functions that open their own connection take."""

CONNECT_TIMEOUT_S = 3
"""How long opening a Postgres connection may take before it fails, seconds (every connection we open)."""


def connect(dsn: str, *, autocommit: bool = False) -> SyncConn:
    """A synchronous connection returning dict rows (CLIs, migrations, batch tasks)."""
    return psycopg.connect(dsn, autocommit=autocommit, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S)


def make_pool(dsn: str, *, max_size: int = 8) -> Pool:
    """An unopened async pool; the caller awaits ``pool.open()`` inside its event loop."""
    return AsyncConnectionPool(
        dsn,
        connection_class=AsyncConn,
        min_size=1,
        max_size=max_size,
        open=False,
        timeout=5.0,
        kwargs={"row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_S},
        check=AsyncConnectionPool.check_connection,
    )


async def ping(pool: Pool, *, timeout_s: float) -> None:
    """Raise unless a pooled connection answers ``SELECT 1`` (readiness); waits at most ``timeout_s`` for one."""
    async with pool.connection(timeout=timeout_s) as conn:
        await conn.execute("SELECT 1")


def database_name(dsn: str) -> str:
    """The database a DSN names."""
    return str(conninfo_to_dict(dsn).get("dbname") or "postgres")


def with_database(dsn: str, dbname: str) -> str:
    """The same DSN pointing at another database (URL DSNs stay URLs)."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))
    return make_conninfo(dsn, dbname=dbname)


def ensure_database(dsn: str) -> bool:
    """Create the DSN's database when it is missing; returns True when it was created."""
    name = database_name(dsn)
    with psycopg.connect(with_database(dsn, "postgres"), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        logger.info("created database %s", name)
        return True


def drop_database(dsn: str) -> None:
    """Drop the DSN's database, ending its other sessions first (test teardown)."""
    name = database_name(dsn)
    with psycopg.connect(with_database(dsn, "postgres"), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
