"""Settings: environment prefix, defaults documented in the README, secrets refused in production."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


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


def test_placeholder_secret_is_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="TRAILCAM_KEY_PEPPER"):
        Settings(environment="production")
    assert Settings(environment="production", key_pepper="a-real-secret").key_pepper == "a-real-secret"


def test_every_setting_is_documented_in_the_readme_with_its_default() -> None:
    text = README.read_text()
    for name, field in Settings.model_fields.items():
        env = f"TRAILCAM_{name.upper()}"
        row = next((line for line in text.splitlines() if line.startswith(f"| `{env}`")), None)
        assert row is not None, f"{env} is missing from the README configuration table"
        default = field.default
        shown = str(default.value if hasattr(default, "value") else default)
        assert re.search(re.escape(shown), row), f"{env}: README row does not show the default {shown!r}"
