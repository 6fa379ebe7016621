"""Domain errors; plain Exception subclasses with picklable arguments (Ray ships them).

They say what went wrong, never how HTTP answers it: serve_app/api/problems.py alone maps them to status and code.
"""

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


class ModelUnreachable(ServiceUnavailable):
    """No ReID model answers this application (none deployed, or its deployment cannot be found)."""

    def __init__(self, detail: str) -> None:
        super().__init__("model", detail)
        self.args = (detail,)  # what unpickling passes back to __init__


class ModelRefused(TrailcamError):
    """A model version cannot be registered, promoted or rolled back to, or another change of the running app's
    model or thresholds holds the lock; the message says why."""


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


class PathRefused(TrailcamError):
    """A path that may not be used under its root; ``reason`` names the rule (``serve_app.paths.REASONS``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class ImageRejected(TrailcamError):
    """An image or image URI refused before it reaches the model; each subclass says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class ImageUriRefused(ImageRejected):
    """The image URI names no path under the image root; ``reason`` is the :class:`PathRefused` rule it broke."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.args = (reason, detail)  # what unpickling passes back to __init__
        self.reason = reason


class ImageNotFound(ImageRejected):
    """No image file exists at the image URI."""


class ImageUnreadable(ImageRejected):
    """The image file exists but the operating system refuses to read it."""


class ImageTooLarge(ImageRejected):
    """The image file has more bytes than the configured limit."""


class ImageTooManyPixels(ImageRejected):
    """The image header declares more pixels than the configured limit (a decompression bomb)."""


class UnsupportedImageType(ImageRejected):
    """The image is neither JPEG nor PNG."""


class UndecodableImage(ImageRejected):
    """The bytes are not an image any decoder recognises."""


class CorruptImage(ImageRejected):
    """The image is recognised but its data is corrupt or truncated."""


class JobGone(TrailcamError):
    """An export job was deleted, expired or ended by someone else while its runner worked."""


class ProfileRefused(TrailcamError):
    """A change a deer profile cannot take in its present state; each subclass says why."""

    default_detail = "the deer profile cannot take this change"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail or self.default_detail

    def __str__(self) -> str:
        return self.detail


class DeerMerged(ProfileRefused):
    """The profile was merged into another: it is read-only and takes no detection."""

    default_detail = "the deer profile was merged into another"


class DeerNotInSite(ProfileRefused):
    """The chosen profile does not exist at the detection's site (or the key cannot see it)."""

    default_detail = "the deer profile does not exist at this detection's site"


class MergeAcrossSites(ProfileRefused):
    """Two profiles of different sites cannot be merged."""

    default_detail = "profiles of different sites cannot be merged"
