"""One Settings class for the whole project (environment prefix TRAILCAM_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PostgresDsn, RedisDsn, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "change-me"  # noqa: S105 - the value refused outside development
MAX_NOTIFY_BUDGET_S = 900.0
"""Longest one export notification may keep retrying (every try timing out, plus the waits), seconds."""
DEFAULT_SCIENTIFIC_NAME = "Odocoileus virginianus"
"""The taxon an export names when none is configured (white-tailed deer): Settings and the runner share it."""


def notify_budget_s(*, attempts: int, timeout_s: float, backoff_s: float) -> float:
    """Longest one export notification keeps trying, seconds: every try timing out plus every wait between
    them (``backoff_s``, doubling after each)."""
    return attempts * timeout_s + backoff_s * ((1 << (attempts - 1)) - 1)


class Settings(BaseSettings):
    """Runtime settings read from TRAILCAM_* environment variables (or a .env file)."""

    model_config = SettingsConfigDict(env_prefix="TRAILCAM_", env_file=".env", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    database_url: PostgresDsn = Field(
        default=PostgresDsn("postgresql://postgres@127.0.0.1:5432/trailcam"),
        description="Postgres DSN; the database is created by the migration runner when missing.",
    )
    redis_url: RedisDsn = Field(
        default=RedisDsn("redis://127.0.0.1:6379/0"),
        description="Redis URL holding export job status and leases.",
    )
    image_root: Path = Field(default=Path(".data/images"), description="Only image URIs under this folder are read.")
    export_dir: str = Field(
        default=".data/exports",
        description="Where export files are written: a local folder or any pyarrow filesystem URI.",
    )
    export_status_ttl_s: int = Field(default=3600, ge=1, description="Lifetime of an export job's status, seconds.")
    export_lease_s: float = Field(default=10.0, gt=0, description="Runner heartbeat lease, seconds.")
    export_start_grace_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a queued export may wait for a Ray worker before it is failed, seconds.",
    )
    export_sweep_interval_s: float = Field(
        default=5.0, gt=0, description="Period of the sweeper that fails lapsed jobs and removes old files, seconds."
    )
    export_task_num_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved by each export task.")
    export_scientific_name: str = Field(
        default=DEFAULT_SCIENTIFIC_NAME, description="Taxon written into Camtrap DP observations."
    )
    key_pepper: str = Field(
        default=PLACEHOLDER_SECRET,
        description="Secret mixed into API-key hashes; must be changed outside development and test.",
    )
    key_cache_s: float = Field(default=5.0, ge=0, description="How long a verified API key is cached, seconds.")
    export_tracked_max: int = Field(
        default=10_000, ge=1, description="Most running exports one ingress replica can cancel early on delete."
    )
    key_cache_max_entries: int = Field(
        default=10_000, ge=1, description="Most verified keys, and separately most refused tokens, cached per process."
    )
    db_pool_max: int = Field(default=8, ge=1, description="Connections per process pool.")
    score_database_url: PostgresDsn | None = Field(
        default=None,
        description="Where the ReID score log writes (its own connection); None means database_url.",
    )
    max_upload_bytes: int = Field(default=10_000_000, ge=1, description="Largest accepted image upload, bytes.")
    max_json_body_bytes: int = Field(
        default=1_000_000,
        ge=1,
        description="Largest body of any request but an image upload, bytes; more is refused (413) unread.",
    )
    max_image_bytes: int = Field(default=20_000_000, ge=1, description="Largest image file read by URI, bytes.")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="Largest decoded image, pixels (decompression-bomb guard)."
    )

    ui_session_secret: str = Field(
        default=PLACEHOLDER_SECRET,
        description="Secret that signs the web UI's session cookie and seals the key it keeps; must be changed "
        "outside development and test.",
    )
    ui_session_ttl_s: int = Field(default=12 * 3600, ge=60, description="Lifetime of a web UI sign-in, seconds.")
    ui_cookie_secure: bool | None = Field(
        default=None,
        description="Secure flag of the web UI's cookies; None: in production, or when a page is served over HTTPS.",
    )
    smtp_host: str | None = Field(
        default=None, description="SMTP server for export e-mails; None (or blank) sends none."
    )
    smtp_port: int = Field(default=25, ge=1, le=65535, description="SMTP port.")
    smtp_username: str | None = Field(default=None, description="SMTP user name (None: no login).")
    smtp_password: str | None = Field(default=None, description="SMTP password.")
    smtp_starttls: bool = Field(default=False, description="Upgrade the SMTP connection with STARTTLS.")
    smtp_from: str = Field(default="trailcam-reid@localhost", description="From-address of export e-mails.")
    webhook_secret: str = Field(
        default=PLACEHOLDER_SECRET,
        description="Secret that signs export webhooks (HMAC-SHA256); must be changed outside development and test.",
    )
    webhook_private_targets: bool = Field(
        default=False,
        description="Allow export webhooks to loopback, private and link-local addresses (off: refused).",
    )
    notify_attempts: int = Field(default=5, ge=1, le=20, description="Tries per export notification.")
    notify_backoff_s: float = Field(
        default=1.0, ge=0, description="First wait between notification tries, seconds; doubles after each."
    )
    notify_timeout_s: float = Field(default=10.0, gt=0, description="Timeout of one notification try, seconds.")

    @field_validator("smtp_host", mode="before")
    @classmethod
    def _blank_smtp_host_is_none(cls, value: object) -> object:
        # TRAILCAM_SMTP_HOST="" (a blanked variable) means no SMTP server, for the request check and delivery alike.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _bounded_notifications(self) -> Settings:
        # What an export task may wait on its notifications.
        budget = notify_budget_s(
            attempts=self.notify_attempts, timeout_s=self.notify_timeout_s, backoff_s=self.notify_backoff_s
        )
        if budget > MAX_NOTIFY_BUDGET_S:
            raise ValueError(
                f"notify_attempts, notify_timeout_s and notify_backoff_s allow {budget:.0f} s per notification; "
                f"keep it at most {MAX_NOTIFY_BUDGET_S:.0f} s"
            )
        return self

    @model_validator(mode="after")
    def _enforce_non_default_secrets(self) -> Settings:
        if self.environment != "production":
            return self
        for name in ("key_pepper", "ui_session_secret", "webhook_secret"):
            if getattr(self, name) == PLACEHOLDER_SECRET:
                raise ValueError(f"TRAILCAM_{name.upper()} must be set to a real secret in production")
        return self

    @property
    def database_dsn(self) -> str:
        """The DSN as a plain string for psycopg."""
        return str(self.database_url)

    @property
    def redis_dsn(self) -> str:
        """The Redis URL as a plain string for redis-py."""
        return str(self.redis_url)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
