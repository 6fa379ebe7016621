"""Export job store in Redis: one hash per job; every transition is one Lua compare-and-set.

No job state lives in process memory: the ingress, the runner and the sweeper only ever
read and write these hashes (and the sorted set of running jobs' lease deadlines).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis

from serve_app.exports import scripts

Status = Literal["processing", "completed", "failed"]
CreateOutcome = Literal["created", "existing", "conflict"]
PUBLIC_FIELDS = ("id", "status", "format", "progress", "created_at", "updated_at", "finished_at", "error")
NotificationState = Literal["pending", "sent", "failed"]
NOTIFY_FIELD = "notify"
"""The hash field holding where a job's notifications go: JSON {channel: target} (private: never shown)."""
NOTIFICATION_FIELDS = {"email": "notification_email", "webhook": "notification_webhook"}
"""Channel -> the hash field holding its delivery record, in the order the status lists them."""


def utc_now_iso() -> str:
    """A UTC timestamp as written into job hashes (ISO 8601, milliseconds, Z)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fingerprint(body: Any) -> str:
    """A stable digest of a JSON body (key order ignored), for Idempotency-Key comparisons."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def download_path(job_id: str) -> str:
    """The API path a completed job's file is served from."""
    return f"/api/exports/{job_id}/download"


def public_target(channel: str, target: str) -> str:
    """What the status shows of a target: an address as given, a webhook URL without credentials or query."""
    if channel != "webhook":
        return target
    parts = urlsplit(target)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))


def notification(
    channel: str, *, target: str, state: NotificationState, attempts: int, error: str | None
) -> dict[str, Any]:
    """One delivery record as stored in the job hash and listed in ``notifications``."""
    return {
        "channel": channel,
        "target": public_target(channel, target),
        "state": state,
        "attempts": attempts,
        "error": error,
        "updated_at": utc_now_iso(),
    }


def _pairs(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out.extend((name, "" if value is None else str(value)))
    return out


@dataclass(frozen=True)
class Job:
    """A job as read from its hash."""

    id: str
    fields: dict[str, str]

    @property
    def status(self) -> str:
        """processing, completed or failed."""
        return self.fields.get("status", "")

    @property
    def owner(self) -> int:
        """The API key row id that created the job."""
        return int(self.fields.get("owner") or 0)

    @property
    def file_uri(self) -> str:
        """Where the runner writes (or wrote) the file."""
        return self.fields.get("file_uri", "")

    @property
    def params(self) -> dict[str, Any]:
        """The validated request parameters."""
        loaded: dict[str, Any] = json.loads(self.fields.get("params") or "{}")
        return loaded

    @property
    def notify_targets(self) -> dict[str, str]:
        """Channel (email, webhook) -> where its notification goes, as requested; empty when none was asked."""
        return parse_targets(self.fields.get(NOTIFY_FIELD))

    def public(self) -> dict[str, Any]:
        """What GET /api/exports/{id} answers: no owner, lease or file internals."""
        body: dict[str, Any] = {name: self.fields.get(name) or None for name in PUBLIC_FIELDS}
        body["id"] = self.id
        body["progress"] = float(self.fields.get("progress") or 0.0)
        body["params"] = self.params
        body["download_url"] = self.fields.get("download_url") or None
        body["notifications"] = [
            json.loads(self.fields[name]) for name in NOTIFICATION_FIELDS.values() if self.fields.get(name)
        ]
        return body


def parse_targets(raw: str | None) -> dict[str, str]:
    """The stored ``notify`` field as {channel: target}."""
    loaded = json.loads(raw) if raw else {}
    return {str(k): str(v) for k, v in loaded.items() if k in NOTIFICATION_FIELDS and v}


def _job_from_flat(job_id: str, flat: list[Any]) -> Job:
    return Job(job_id, {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)})


class JobStore:
    """Async access for the ingress and the sweeper."""

    def __init__(self, client: aioredis.Redis, *, status_ttl_s: int, start_grace_s: float) -> None:
        self._redis = client
        self._ttl_ms = int(status_ttl_s * 1000)
        self._start_grace_ms = int(start_grace_s * 1000)
        self._create = client.register_script(scripts.CREATE)
        self._read = client.register_script(scripts.READ)
        self._delete = client.register_script(scripts.DELETE)
        self._transition = client.register_script(scripts.TRANSITION)

    async def create(
        self,
        *,
        owner: int,
        params: dict[str, Any],
        file_uri_for: Any,
        idempotency: tuple[str, str] | None = None,
        notify: dict[str, str] | None = None,
    ) -> tuple[CreateOutcome, Job | None]:
        """Create a processing job (or find the one an Idempotency-Key already made).

        ``file_uri_for(job_id)`` names the job's file; ``idempotency`` is (header value,
        body fingerprint); ``notify`` maps channels to targets, each recorded as pending.
        Returns ("conflict", None) when the key was used with another body.
        """
        job_id = uuid.uuid4().hex
        now = utc_now_iso()
        fields = {
            "id": job_id,
            "owner": owner,
            "status": "processing",
            "format": params["format"],
            "params": json.dumps(params, separators=(",", ":")),
            "progress": 0.0,
            "created_at": now,
            "updated_at": now,
            "file_uri": file_uri_for(job_id),
        }
        if notify:
            fields[NOTIFY_FIELD] = json.dumps(notify, separators=(",", ":"))
            for channel, target in notify.items():
                record = notification(channel, target=target, state="pending", attempts=0, error=None)
                fields[NOTIFICATION_FIELDS[channel]] = json.dumps(record, separators=(",", ":"))
        idem_key = scripts.idempotency_key(owner, idempotency[0]) if idempotency else scripts.job_key(job_id)
        if idempotency:
            fields["idempotency_key"] = idem_key
        result = await self._create(
            keys=[scripts.job_key(job_id), scripts.ACTIVE_KEY, idem_key],
            args=[
                self._ttl_ms,
                self._start_grace_ms,
                idempotency[1] if idempotency else "",
                scripts.JOB_PREFIX,
                job_id,
                *_pairs(fields),
            ],
        )
        outcome, found_id = str(result[0]), str(result[1])
        if outcome == "conflict":
            return "conflict", None
        job = await self.get(found_id, owner=owner)
        return ("existing" if outcome == "existing" else "created"), job

    async def read(self, job_id: str) -> tuple[Job | None, bool]:
        """The job (None when unknown or expired) and whether this read failed it for a lapsed lease."""
        flat = await self._read(
            keys=[scripts.job_key(job_id), scripts.ACTIVE_KEY], args=[job_id, scripts.WORKER_LOST, utc_now_iso()]
        )
        if not flat:
            return None, False
        return _job_from_flat(job_id, flat[1:]), bool(int(flat[0]))

    async def get(self, job_id: str, *, owner: int) -> Job | None:
        """The job when it exists and that key created it."""
        job, _ = await self.read(job_id)
        return job if job is not None and job.owner == owner else None

    async def delete(self, job_id: str, *, owner: int) -> Job | None:
        """Remove the job (any status) and its Idempotency-Key mapping in one script; returns what it was."""
        flat = await self._delete(keys=[scripts.job_key(job_id), scripts.ACTIVE_KEY], args=[job_id, owner])
        return _job_from_flat(job_id, flat) if flat else None

    async def fail(self, job_id: str, *, error: str) -> bool:
        """processing -> failed; False when the job was not processing."""
        now = utc_now_iso()
        fields = {"status": "failed", "error": error, "updated_at": now, "finished_at": now}
        done = await self._transition(
            keys=[scripts.job_key(job_id), scripts.ACTIVE_KEY], args=[job_id, "processing", *_pairs(fields)]
        )
        return bool(done)

    async def lapsed_candidates(self, *, limit: int = 500) -> list[str]:
        """Ids whose recorded lease deadline is already past (by the Redis clock)."""
        seconds, micros = await self._redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        ids = await self._redis.zrangebyscore(scripts.ACTIVE_KEY, "-inf", now_ms, start=0, num=limit)
        return [str(i) for i in ids]


class RunnerLease:
    """Synchronous access for the runner: start, renew, complete or fail its own job."""

    def __init__(self, client: redis.Redis, job_id: str, *, lease_s: float) -> None:
        self._client = client
        self._keys = [scripts.job_key(job_id), scripts.ACTIVE_KEY]
        self._job_id = job_id
        self._lease_ms = int(lease_s * 1000)
        self._renew = client.register_script(scripts.RENEW)
        self._transition = client.register_script(scripts.TRANSITION)

    def renew(self, **fields: Any) -> bool:
        """Extend the lease and set fields; False when the job is no longer processing."""
        fields.setdefault("updated_at", utc_now_iso())
        return bool(self._renew(keys=self._keys, args=[self._job_id, self._lease_ms, *_pairs(fields)]))

    def notify_targets(self) -> dict[str, str]:
        """Where the job's notifications go (read once, when the runner starts)."""
        raw = self._client.hget(self._keys[0], NOTIFY_FIELD)
        return parse_targets(str(raw) if raw else None)

    def finish(self, status: Status, *, finished_at: str | None = None, **fields: Any) -> bool:
        """processing -> completed|failed in one compare-and-set (at ``finished_at``, default now); False when
        someone else ended it."""
        now = finished_at or utc_now_iso()
        values = {"status": status, "updated_at": now, "finished_at": now, **fields}
        return bool(self._transition(keys=self._keys, args=[self._job_id, "processing", *_pairs(values)]))


class NotificationLog:
    """Records how a job's notifications went, in its hash, only while it exists and has ended: a record can
    never recreate a deleted or expired job (HSET keeps the TTL) nor land on a job still processing."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._record = client.register_script(scripts.RECORD_ENDED)

    async def record(self, job_id: str, entry: dict[str, Any]) -> bool:
        """Store one channel's record; False when the job is gone (nothing written)."""
        field = NOTIFICATION_FIELDS[str(entry["channel"])]
        value = json.dumps(entry, separators=(",", ":"))
        return bool(await self._record(keys=[scripts.job_key(job_id)], args=[field, value]))
