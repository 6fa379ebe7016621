"""What an export notification says: the facts of an ended job, as a webhook's JSON body and as an e-mail.

The body's fields are documented for receivers (docs/operations.md, "Notifications"); the webhook's signature
is serve_app/exports/signature.py's, its delivery serve_app/exports/notify.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from serve_app.exports.jobs import Job


@dataclass(frozen=True)
class Ended:
    """What the notifications of one ended job say, and where they go (channel -> target)."""

    id: str
    status: str
    format: str
    finished_at: str
    params: dict[str, Any]
    targets: dict[str, str]
    download_url: str | None = None
    error: str | None = None
    rows: int | None = None

    @classmethod
    def from_job(cls, job: Job) -> Ended:
        """The notification of a job as read from its hash after its final transition."""
        f = job.fields
        rows = f.get("rows")
        return cls(
            id=job.id,
            status=job.status,
            format=f.get("format", ""),
            finished_at=f.get("finished_at") or f.get("updated_at", ""),
            params=job.params,
            targets=job.notify_targets,
            download_url=f.get("download_url") or None,
            error=f.get("error") or None,
            rows=int(rows) if rows else None,
        )

    @property
    def event(self) -> str:
        """export.completed or export.failed (the ``Trailcam-Event`` header)."""
        return f"export.{self.status}"


def webhook_body(ended: Ended) -> bytes:
    """The JSON body a webhook receives (the bytes that are signed)."""
    payload = {
        "id": ended.id,
        "event": ended.event,
        "status": ended.status,
        "format": ended.format,
        "finished_at": ended.finished_at,
        "download_url": ended.download_url,
        "error": ended.error,
        "rows": ended.rows,
        "params": ended.params,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def email_message(ended: Ended, *, sender: str, to: str) -> EmailMessage:
    """The plain-text e-mail for an ended job."""
    p = ended.params
    lines = [
        f"Your trailcam-reid export {ended.id} has {ended.status}.",
        "",
        f"Format: {ended.format}",
        f"Period: {p.get('start_date')} to {p.get('end_date')}, by {p.get('group_by')}",
        f"Finished: {ended.finished_at}",
    ]
    if ended.status == "completed":
        lines.append(f"Rows: {ended.rows if ended.rows is not None else 'unknown'}")
        lines.append(f"Download: {ended.download_url} (with the API key that asked for it, until the job expires)")
    else:
        lines.append(f"Error: {ended.error}")
    message = EmailMessage()
    message["Subject"] = f"trailcam-reid export {ended.status}: {ended.id}"
    message["From"] = sender
    message["To"] = to
    message["Date"] = formatdate(usegmt=True)
    # A domain of our own: make_msgid's default asks the resolver for this host's name, which can block.
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "trailcam-reid")
    message.set_content("\n".join(lines) + "\n")
    return message
