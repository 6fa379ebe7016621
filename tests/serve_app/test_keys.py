"""API keys: created for all or some sites, stored only as hashes, revocable; the HTTP side checks them."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import pytest

from serve_app.keys import hash_key, parse_sites
from tests import factories


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve_app.keys", *args],
        env={"TRAILCAM_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin", "PYTHONPATH": "."},
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_creates_a_key_printed_last_and_stores_only_its_hash(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    s1, s2 = factories.site(db), factories.site(db)
    out = _cli(database_url, "create", "--sites", f"{s1},{s2}")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("tcr_") and len(key) > 40
    row = db.execute("SELECT key_hash, all_sites, site_ids FROM api_keys").fetchone()
    assert row["key_hash"] == hash_key(key, pepper=factories.TEST_PEPPER)
    assert key not in str(db.execute("SELECT * FROM api_keys").fetchall())
    assert (row["all_sites"], sorted(row["site_ids"])) == (False, sorted([s1, s2]))


def test_cli_refuses_unknown_sites_and_bad_syntax(database_url: str, db: psycopg.Connection[Any]) -> None:
    assert _cli(database_url, "create", "--sites", "424242").returncode == 2
    assert _cli(database_url, "create", "--sites", "one,two").returncode == 2
    assert db.execute("SELECT count(*) AS n FROM api_keys").fetchone()["n"] == 0


def test_cli_revokes_a_key(database_url: str, db: psycopg.Connection[Any]) -> None:
    key = _cli(database_url, "create", "--sites", "all").stdout.strip().splitlines()[-1]
    assert _cli(database_url, "revoke", key).returncode == 0
    assert db.execute("SELECT revoked_at IS NOT NULL AS r FROM api_keys").fetchone()["r"] is True
    assert _cli(database_url, "revoke", key).returncode == 1


def test_parse_sites() -> None:
    assert parse_sites("all") is None
    assert parse_sites("2, 1,2") == [1, 2]
    with pytest.raises(ValueError, match="--sites"):
        parse_sites("0")


def test_make_runs_development_key_is_kept_while_valid_and_replaced_once_revoked(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Any
) -> None:
    path = tmp_path / "dev-api-key"

    def dev_key() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "cluster/local/dev_key.py", str(path)],
            env={"TRAILCAM_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin", "PYTHONPATH": "."},
            capture_output=True,
            text=True,
            check=False,
        )

    first = dev_key()
    assert first.returncode == 0, first.stderr
    key = path.read_text().strip()
    again = dev_key()  # a second `make run`
    assert again.returncode == 0, again.stderr
    assert "development key (all sites) in" in again.stdout and path.read_text().strip() == key
    assert _cli(database_url, "revoke", key).returncode == 0
    replaced = dev_key()
    assert replaced.returncode == 0, replaced.stderr
    assert "created a development key" in replaced.stdout and path.read_text().strip() != key
