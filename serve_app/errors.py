"""Domain errors; plain Exception subclasses with picklable arguments (Ray ships them)."""

from __future__ import annotations


class TrailcamError(Exception):
    """Base class of every error this project raises on purpose."""


class ServiceUnavailable(TrailcamError):
    """A backing service (Redis, Postgres, the model) does not answer."""

    def __init__(self, service: str, detail: str = "") -> None:
        super().__init__(service, detail)
        self.service = service
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.service} unavailable: {self.detail}" if self.detail else f"{self.service} unavailable"


class NotFound(TrailcamError):
    """The resource does not exist or is not visible to the caller's key."""


class InvalidKey(TrailcamError):
    """The API key is missing, unknown or revoked."""


class MigrationError(TrailcamError):
    """A schema migration could not be applied."""


class ImageConflict(TrailcamError):
    """An image URI already recorded for another camera or capture time (an image belongs to one camera)."""

    def __init__(self, uri: str, detail: str = "") -> None:
        super().__init__(uri, detail)
        self.uri = uri
        self.detail = detail or "image_uri is already recorded for another camera or capture time"

    def __str__(self) -> str:
        return self.detail
