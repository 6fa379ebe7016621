"""Settings: environment prefix, defaults documented in docs/operations.md, secrets refused in production."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.config import Settings

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_environment_variables_with_prefix_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAILCAM_EXPORT_STATUS_TTL_S", "2")
    monkeypatch.setenv("TRAILCAM_REDIS_URL", "redis://127.0.0.1:6390/3")
    settings = Settings()
    assert settings.export_status_ttl_s == 2
    assert settings.redis_dsn == "redis://127.0.0.1:6390/3"


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAILCAM_EXPORT_STATUS_TTL_S", "0")
    with pytest.raises(ValidationError, match="export_status_ttl_s"):
        Settings()


@pytest.mark.parametrize("secret", ["key_pepper", "ui_session_secret", "webhook_secret"])
def test_placeholder_secret_is_refused_in_production(secret: str) -> None:
    real = {"key_pepper": "pepper-1", "ui_session_secret": "session-1", "webhook_secret": "webhook-1"}
    with pytest.raises(ValidationError, match=f"TRAILCAM_{secret.upper()}"):
        Settings(environment="production", **{**real, secret: "change-me"})
    assert getattr(Settings(environment="production", **real), secret) == real[secret]
    assert Settings(environment="development").ui_session_secret == "change-me"  # fine outside production


def _configuration_table() -> dict[str, str]:
    """The configuration table of docs/operations.md: variable -> the default column, backticks removed."""
    rows: dict[str, str] = {}
    for line in OPERATIONS.read_text().splitlines():
        match = re.match(r"\| `(TRAILCAM_[A-Z0-9_]+)` \| ([^|]*) \|", line)
        if match:
            rows[match[1]] = match[2].strip().strip("`")
    return rows


def test_every_setting_is_documented_in_the_configuration_table_with_its_default() -> None:
    table = _configuration_table()
    for name, field in Settings.model_fields.items():
        env = f"TRAILCAM_{name.upper()}"
        assert env in table, f"{env} is missing from the configuration table in docs/operations.md"
        default = field.default
        shown = str(default.value if hasattr(default, "value") else default)
        assert table[env] == shown, (
            f"{env}: docs/operations.md shows the default {table[env]!r}, Settings has {shown!r}"
        )


def test_the_configuration_table_documents_only_settings() -> None:
    read = {f"TRAILCAM_{name.upper()}" for name in Settings.model_fields}
    unread = sorted(set(_configuration_table()) - read)
    assert not unread, f"documented in docs/operations.md but read by no Settings field: {unread}"
