"""Apply the numbered SQL migrations in order, each in its own transaction.

Run as ``python -m serve_app.store.migrate``; creates the database when it is missing. Migrations are
append-only: each applied file's SHA-256 is recorded, and a file renamed or edited after it was applied is
refused (the change belongs in a new numbered file).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from serve_app.config import get_settings
from serve_app.errors import MigrationError
from serve_app.store.db import ensure_database

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
# One advisory lock id so two migrators (two `make run`s, parallel tests) never interleave.
_LOCK_ID = 0x7472_6169_6C63
# Applied under a name the folder no longer has, before renames were refused: ff89717 renamed the first 006 and
# rewrote it under the same number; 007 brings a database that applied the old text to today's schema.
RENAMED = {(6, "006_site_delete_bumps.sql"): "006_site_delete.sql"}


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    path: Path

    def sql(self) -> bytes:
        """The file's statements."""
        return self.path.read_bytes()

    def checksum(self) -> str:
        """SHA-256 of the file, recorded when it is applied."""
        return hashlib.sha256(self.sql()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in a folder, ordered by number; refuses duplicate numbers."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file name must look like 001_name.sql: {path.name}")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations numbered {version}: {found[version].name}, {path.name}")
        found[version] = Migration(version, path.name, path)
    return [found[v] for v in sorted(found)]


def check_unchanged(migration: Migration, *, name: str, checksum: str | None) -> None:
    """Refuse a migration file renamed or edited since it was applied (as ``name`` with ``checksum``)."""
    rule = "never edit or rename an applied migration; put the change in a new numbered file"
    if name != migration.name and RENAMED.get((migration.version, name)) != migration.name:
        raise MigrationError(
            f"migration {migration.version} was applied as {name}, the folder has {migration.name}: {rule}"
        )
    if checksum is not None and checksum != migration.checksum():
        raise MigrationError(f"{migration.name} was edited after it was applied: {rule}")


def apply_migrations(dsn: str, *, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every pending migration; returns the names applied (empty when up to date)."""
    ensure_database(dsn)
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            # NULL for migrations applied before checksums were recorded: trusted as they are, and the
            # file's checksum is recorded now so that any later edit is caught.
            conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text")
            done = {
                row[0]: (row[1], row[2])
                for row in conn.execute("SELECT version, name, checksum FROM schema_migrations")
            }
            for migration in discover(directory):
                if migration.version in done:
                    check_unchanged(migration, name=done[migration.version][0], checksum=done[migration.version][1])
                    if done[migration.version][1] is None:
                        conn.execute(
                            "UPDATE schema_migrations SET checksum = %s WHERE version = %s AND checksum IS NULL",
                            (migration.checksum(), migration.version),
                        )
                    continue
                try:
                    with conn.transaction():
                        conn.execute(migration.sql())
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                            (migration.version, migration.name, migration.checksum()),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"{migration.name} failed: {exc}") from exc
                logger.info("applied migration %s", migration.name)
                applied.append(migration.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", help="overrides TRAILCAM_DATABASE_URL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dsn = args.database_url or get_settings().database_dsn
    applied = apply_migrations(dsn)
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "; schema up to date"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
