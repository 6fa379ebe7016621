"""Export request rules VR-001..VR-008 plus shape checks, all evaluated together in plain Python."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from serve_app.keys import Principal

GROUP_BY = ("day", "week", "month")
FORMATS = ("csv", "parquet", "json", "camtrap-dp")
REQUIRED_FIELDS = ("start_date", "end_date", "group_by", "format")
OPTIONAL_FIELDS = ("site_ids", "notify")
NOTIFY_FIELDS = ("email", "webhook_url")
MAX_RANGE_DAYS = 365
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_EMAIL_CHARS = 254
MAX_EMAIL_LOCAL_CHARS = 64
MAX_URL_CHARS = 2048
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+$")
"""An ASCII address with a dotted domain (name@example.org): what an SMTP server takes without extensions."""


@dataclass(frozen=True)
class RuleError:
    """One failed rule: its stable code, the field it concerns and a readable reason."""

    rule: str
    field: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        """The ``errors[]`` item of a problem+json body."""
        return {"rule": self.rule, "field": self.field, "detail": self.detail}


@dataclass(frozen=True)
class ExportRequest:
    """A request that passed every rule; ``site_ids`` None means all of the key's sites."""

    start_date: dt.date
    end_date: dt.date
    group_by: str
    format: str
    site_ids: tuple[int, ...] | None
    notify: dict[str, str] | None = None
    """Channel (email, webhook) -> target; None when no notification was asked."""

    def params(self, principal: Principal) -> dict[str, Any]:
        """JSON-able parameters for the runner, with the site scope resolved against the key."""
        sites = list(self.site_ids) if self.site_ids is not None else principal.site_filter()
        return {
            "start_date": self.start_date.isoformat(),
            "end_date": self.end_date.isoformat(),
            "group_by": self.group_by,
            "format": self.format,
            "site_ids": sites,
        }


def _parse_date(body: dict[str, Any], name: str, errors: list[RuleError]) -> dt.date | None:
    value = body.get(name)
    if name not in body:
        return None
    if not isinstance(value, str) or not _DATE.match(value):
        errors.append(RuleError("format", name, f"{name} must be a date formatted YYYY-MM-DD, got {value!r}"))
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        errors.append(RuleError("format", name, f"{name} is not a calendar date: {value!r}"))
        return None


def requested_site_ids(body: object) -> list[int]:
    """The well-formed site ids a body asks for (empty when there are none), to look up before validating."""
    raw = body.get("site_ids") if isinstance(body, dict) else None
    if not isinstance(raw, list):
        return []
    return sorted({v for v in raw if isinstance(v, int) and not isinstance(v, bool) and v > 0})


def _parse_sites(
    body: dict[str, Any], principal: Principal, unknown: Collection[int], errors: list[RuleError]
) -> tuple[int, ...] | None:
    if "site_ids" not in body or body["site_ids"] is None:
        return None
    raw = body["site_ids"]
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in raw)
    ):
        errors.append(RuleError("format", "site_ids", "site_ids must be a non-empty list of positive integer ids"))
        return None
    sites = tuple(sorted(set(raw)))
    denied = [s for s in sites if not principal.allows(s)]
    if denied:
        errors.append(
            RuleError("site_access", "site_ids", f"site id(s) not available to this key: {', '.join(map(str, denied))}")
        )
    missing = [s for s in sites if s in unknown and s not in denied]
    if missing:
        errors.append(RuleError("site_access", "site_ids", f"unknown site id(s): {', '.join(map(str, missing))}"))
    return sites


def _email_rules(value: object, *, email_configured: bool) -> list[RuleError]:
    errors: list[RuleError] = []
    if not (
        isinstance(value, str)
        and len(value) <= MAX_EMAIL_CHARS
        and _EMAIL.match(value)
        and len(value.rpartition("@")[0]) <= MAX_EMAIL_LOCAL_CHARS
    ):
        shown = repr(value[:80]) if isinstance(value, str) else f"a {type(value).__name__}"
        errors.append(
            RuleError("VR-006", "notify.email", f"notify.email must be an address like name@example.org, got {shown}")
        )
    if not email_configured:
        errors.append(
            RuleError("VR-008", "notify.email", "e-mail notifications are not configured on this server (no SMTP host)")
        )
    return errors


def _webhook_problem(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return "notify.webhook_url must be a non-empty URL string"
    if len(value) > MAX_URL_CHARS:
        return f"notify.webhook_url is longer than {MAX_URL_CHARS} characters"
    if any(c.isspace() or not c.isprintable() for c in value):
        return "notify.webhook_url must not contain spaces or control characters"
    try:
        parts = urlsplit(value)
        _ = parts.port  # a port that is not a number in 0-65535 raises
        httpx.URL(value)  # what the sender will be given: refuse now what it could never send
    except (ValueError, httpx.InvalidURL):
        return "notify.webhook_url is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return f"notify.webhook_url must be an http or https URL, got scheme {parts.scheme or 'none'!r}"
    if not parts.hostname:
        return "notify.webhook_url has no host"
    return None


def _parse_notify(body: dict[str, Any], *, email_configured: bool, errors: list[RuleError]) -> dict[str, str] | None:
    raw = body.get("notify")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        errors.append(RuleError("format", "notify", 'notify must be an object {"email": ..., "webhook_url": ...}'))
        return None
    found: list[RuleError] = [
        RuleError("unknown_field", f"notify.{name}", f"unknown field {name!r}")
        for name in sorted(set(map(str, raw)) - set(NOTIFY_FIELDS))
    ]
    email, url = raw.get("email"), raw.get("webhook_url")
    if email is None and url is None and not found:
        found.append(RuleError("missing_field", "notify", "notify needs an email, a webhook_url or both"))
    if email is not None:
        found.extend(_email_rules(email, email_configured=email_configured))
    problem = _webhook_problem(url) if url is not None else None
    if problem:
        found.append(RuleError("VR-007", "notify.webhook_url", problem))
    errors.extend(found)
    if found:
        return None
    targets = {"email": email, "webhook": url}
    return {channel: str(target) for channel, target in targets.items() if target is not None}


def only_notify_failed(errors: Collection[RuleError]) -> bool:
    """Whether every failure concerns ``notify``: the export itself is valid, its notification cannot be used
    (answered 422, where a failed export rule is a 400)."""
    return bool(errors) and all(e.field == "notify" or e.field.startswith("notify.") for e in errors)


def _idempotency_rule(key: str | None) -> list[RuleError]:
    if key is None or (key.strip() and len(key) <= MAX_IDEMPOTENCY_KEY_CHARS):
        return []
    return [RuleError("format", "Idempotency-Key", f"must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters")]


def _date_rules(start: dt.date | None, end: dt.date | None, today: dt.date) -> list[RuleError]:
    errors: list[RuleError] = []
    if start is not None and end is not None:
        if start >= end:
            errors.append(RuleError("VR-001", "end_date", f"start_date {start} must be before end_date {end}"))
        elif (end - start).days > MAX_RANGE_DAYS:
            errors.append(
                RuleError(
                    "VR-002",
                    "end_date",
                    f"the range spans {(end - start).days} days; at most {MAX_RANGE_DAYS} are allowed",
                )
            )
    if start is not None and start > today:
        errors.append(RuleError("VR-004", "start_date", f"start_date {start} is after today ({today}, UTC)"))
    if end is not None and end > today:
        errors.append(RuleError("VR-005", "end_date", f"end_date {end} is after today ({today}, UTC)"))
    return errors


def validate_export_request(
    body: object,
    *,
    principal: Principal,
    today: dt.date,
    unknown_site_ids: Collection[int] = (),
    idempotency_key: str | None = None,
    email_configured: bool = False,
) -> tuple[ExportRequest | None, list[RuleError]]:
    """Check every rule on a decoded JSON body, the request's Idempotency-Key and the site ids found
    unknown (``unknown_site_ids``); returns the request or every failure found, all together.
    ``email_configured``: whether this server can send e-mail (an SMTP host is set)."""
    if not isinstance(body, dict):
        return None, [
            RuleError("format", "body", "the body must be a JSON object"),
            *_idempotency_rule(idempotency_key),
        ]
    errors: list[RuleError] = []
    known = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
    for name in sorted(set(body) - known):
        errors.append(RuleError("unknown_field", str(name), f"unknown field {name!r}"))
    for name in REQUIRED_FIELDS:
        if name not in body:
            errors.append(RuleError("missing_field", name, f"{name} is required"))
    start = _parse_date(body, "start_date", errors)
    end = _parse_date(body, "end_date", errors)
    group_by = body.get("group_by")
    if "group_by" in body and group_by not in GROUP_BY:
        errors.append(
            RuleError("VR-003", "group_by", f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
        )
    fmt = body.get("format")
    if "format" in body and fmt not in FORMATS:
        errors.append(RuleError("invalid_value", "format", f"format must be one of {', '.join(FORMATS)}, got {fmt!r}"))
    sites = _parse_sites(body, principal, unknown_site_ids, errors)
    notify = _parse_notify(body, email_configured=email_configured, errors=errors)
    errors.extend(_date_rules(start, end, today))
    errors.extend(_idempotency_rule(idempotency_key))
    if errors or start is None or end is None:
        return None, errors
    return ExportRequest(start, end, str(group_by), str(fmt), sites, notify), []
