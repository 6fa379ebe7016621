"""Export notifications: an e-mail and/or a signed webhook when a job ends, retried with backoff.

The process that made a job's final transition sends them, once, after the status is written: the runner (in
a background thread, which its Ray task waits for at most the delivery limit) or the ingress (an asyncio
task, when the sweeper or a reader failed a lapsed job, or a task could not start). Nothing here changes a
job's outcome; each channel's progress is recorded in the job's hash and listed in its status.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import smtplib
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage

import httpx
import redis.asyncio as aioredis

from serve_app.config import Settings, notify_budget_s
from serve_app.exports.addresses import IPAddress, Pinned, is_public, pinned, resolve
from serve_app.exports.jobs import Job, NotificationLog, NotificationState, notification
from serve_app.exports.notices import Ended, email_message, webhook_body
from serve_app.exports.signature import EVENT_HEADER, SIGNATURE_HEADER, sign, verify_signature

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300
SMTP_THREADS = 4
"""Threads per process that talk SMTP (smtplib blocks); further e-mails wait for one."""
RECORD_TIMEOUT_S = 2.0
"""Longest wait for Redis to record one delivery step, seconds; a record that fails is logged and skipped."""
LIMIT_SLACK_S = 2 * RECORD_TIMEOUT_S + 1.0
"""Added to a delivery's budget for its records and thread start, seconds: the hard limit of a delivery."""


@dataclass(frozen=True)
class NotifyConfig:
    """The delivery settings (Settings.smtp_*, webhook_secret, notify_*); picklable, it travels to the task."""

    smtp_host: str | None
    smtp_port: int
    smtp_username: str | None
    smtp_password: str | None = field(repr=False)
    smtp_starttls: bool
    smtp_from: str
    webhook_secret: str = field(repr=False)
    attempts: int
    backoff_s: float
    timeout_s: float
    private_targets: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> NotifyConfig:
        """The delivery settings of ``settings``."""
        return cls(
            smtp_host=settings.smtp_host,
            smtp_port=settings.smtp_port,
            smtp_username=settings.smtp_username,
            smtp_password=settings.smtp_password,
            smtp_starttls=settings.smtp_starttls,
            smtp_from=settings.smtp_from,
            webhook_secret=settings.webhook_secret,
            attempts=settings.notify_attempts,
            backoff_s=settings.notify_backoff_s,
            timeout_s=settings.notify_timeout_s,
            private_targets=settings.webhook_private_targets,
        )

    @property
    def budget_s(self) -> float:
        """Longest one channel's delivery takes, seconds (:func:`serve_app.config.notify_budget_s`)."""
        return notify_budget_s(attempts=self.attempts, timeout_s=self.timeout_s, backoff_s=self.backoff_s)

    @property
    def limit_s(self) -> float:
        """The hard limit of one delivery, seconds: its budget plus room for recording each step."""
        return self.budget_s + LIMIT_SLACK_S


@dataclass(frozen=True)
class _Failure:
    """One attempt that did not deliver: why, and whether another attempt may."""

    error: str
    retry: bool


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".rstrip(": ").strip()
    return (text.splitlines() or [type(exc).__name__])[0][:MAX_ERROR_CHARS]


_smtp_lock = threading.Lock()
_smtp_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _smtp_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process's SMTP threads (not the event loop's default executor, which other work needs)."""
    global _smtp_pool
    with _smtp_lock:
        if _smtp_pool is None:
            _smtp_pool = concurrent.futures.ThreadPoolExecutor(SMTP_THREADS, thread_name_prefix="export-smtp")
        return _smtp_pool


def _send_mail(message: EmailMessage, config: NotifyConfig) -> None:
    """One SMTP session (blocking): STARTTLS and login as configured, then the message."""
    smtp = smtplib.SMTP(str(config.smtp_host), config.smtp_port, timeout=config.timeout_s)
    try:
        if config.smtp_starttls:
            smtp.starttls(context=ssl.create_default_context())
        if config.smtp_username:
            smtp.login(config.smtp_username, config.smtp_password or "")
        smtp.send_message(message)
        # Sent: a server that fumbles the goodbye must not make it look failed (a retry would send it twice).
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
    finally:
        smtp.close()


def _smtp_failure(exc: Exception) -> _Failure:
    """Transient (4xx replies, a dropped or refused connection, a timeout) may be retried; 5xx may not."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):  # one recipient per message: its reply says it all
        code, text = next(iter(exc.recipients.values()), (550, b"recipient refused"))
        reply = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        return _Failure(f"SMTP {code}: {reply}".splitlines()[0][:MAX_ERROR_CHARS], retry=400 <= code < 500)
    if isinstance(exc, smtplib.SMTPResponseException):
        reply = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        return _Failure(f"SMTP {exc.smtp_code}: {reply}".splitlines()[0][:MAX_ERROR_CHARS], 400 <= exc.smtp_code < 500)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return _Failure(_one_line(exc), retry=True)
    if isinstance(exc, smtplib.SMTPException):  # e.g. STARTTLS or AUTH not offered: the same next time
        return _Failure(_one_line(exc), retry=False)
    return _Failure(_one_line(exc), retry=isinstance(exc, OSError))


async def _mail(ended: Ended, to: str, config: NotifyConfig) -> _Failure | None:
    if not config.smtp_host:
        return _Failure("e-mail is not configured on this server (TRAILCAM_SMTP_HOST)", retry=False)
    message = email_message(ended, sender=config.smtp_from, to=to)
    try:
        await asyncio.get_running_loop().run_in_executor(_smtp_executor(), _send_mail, message, config)
    except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded, none escapes
        return _smtp_failure(exc)
    return None


async def _post_pinned(
    client: httpx.AsyncClient, url: str, addresses: list[IPAddress], *, body: bytes, headers: dict[str, str]
) -> tuple[int, str]:
    """POST to the first of ``addresses`` (those checked) that takes the connection, as a client tries each of a
    host's addresses, but never to a new lookup of the host; returns the answer's status and reason."""
    *others, last = addresses
    for address in others:
        with contextlib.suppress(httpx.ConnectError):  # the last address's error is the one reported
            return await _post_to(client, pinned(url, address), body=body, headers=headers)
    return await _post_to(client, pinned(url, last), body=body, headers=headers)


async def _post_to(
    client: httpx.AsyncClient, request: Pinned, *, body: bytes, headers: dict[str, str]
) -> tuple[int, str]:
    # Streamed and never read: only the status matters, and a receiver's body can be of any size.
    async with client.stream(
        "POST", request.url, content=body, headers=headers | request.headers, extensions=request.extensions
    ) as resp:
        return resp.status_code, resp.reason_phrase


async def _post(ended: Ended, url: str, config: NotifyConfig, client: httpx.AsyncClient) -> _Failure | None:
    host = httpx.URL(url).raw_host.decode("ascii")
    body = webhook_body(ended)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "trailcam-reid",
        EVENT_HEADER: ended.event,
        SIGNATURE_HEADER: sign(config.webhook_secret, body),  # signed per attempt: a retry carries a fresh time
    }
    try:
        async with asyncio.timeout(config.timeout_s):
            try:
                addresses = await resolve(host)
            except OSError as exc:
                return _Failure(f"cannot resolve {host}: {_one_line(exc)}", retry=True)
            # A host resolving to a loopback, private, link-local or otherwise non-public address is not sent to
            # (unless Settings.webhook_private_targets): an export request must not reach inside the network.
            if not config.private_targets and not all(is_public(a) for a in addresses):
                refusal = f"refused: {host} is not a public address (TRAILCAM_WEBHOOK_PRIVATE_TARGETS)"
                return _Failure(refusal, retry=False)
            status, reason = await _post_pinned(client, url, addresses, body=body, headers=headers)
    except TimeoutError:
        return _Failure(f"no answer within {config.timeout_s:g} s", retry=True)
    except httpx.TransportError as exc:  # connection refused or reset, DNS, TLS, protocol, httpx's own timeouts
        return _Failure(_one_line(exc), retry=True)
    if 200 <= status < 300:
        return None
    return _Failure(f"HTTP {status} {reason}".strip(), retry=status == 429 or status >= 500)


async def _record(
    log: NotificationLog, ended: Ended, channel: str, *, state: NotificationState, attempts: int, error: str | None
) -> None:
    entry = notification(channel, target=ended.targets[channel], state=state, attempts=attempts, error=error)
    try:
        async with asyncio.timeout(RECORD_TIMEOUT_S):
            await log.record(ended.id, entry)
    except Exception as exc:  # noqa: BLE001 - a step that cannot be recorded must not stop the delivery
        logger.warning("export %s: cannot record the %s notification: %s", ended.id, channel, exc)


async def _deliver_channel(
    ended: Ended,
    channel: str,
    send: Callable[[], Awaitable[_Failure | None]],
    *,
    config: NotifyConfig,
    log: NotificationLog,
) -> None:
    """Try up to ``config.attempts`` times, waiting backoff_s, 2 x backoff_s, ... between tries, within the
    budget; records each failed try (pending) and the end (sent or failed)."""
    attempts, error = 0, None
    state: NotificationState = "failed"
    try:
        # The budget plus room for the records between tries; the last record comes after it.
        async with asyncio.timeout(config.budget_s + RECORD_TIMEOUT_S):
            while True:
                attempts += 1
                failure = await send()
                if failure is None:
                    state, error = "sent", None
                    break
                error = failure.error
                if not failure.retry or attempts >= config.attempts:
                    break
                await _record(log, ended, channel, state="pending", attempts=attempts, error=error)
                await asyncio.sleep(config.backoff_s * (1 << (attempts - 1)))
    except TimeoutError:
        error = f"gave up after {config.budget_s:g} s: {error or 'no answer'}"[:MAX_ERROR_CHARS]
    except asyncio.CancelledError:
        await _record(log, ended, channel, state="failed", attempts=attempts, error="interrupted: the process stopped")
        raise
    except Exception as exc:  # noqa: BLE001 - a notification must never take its process down
        error = _one_line(exc)
    await _record(log, ended, channel, state=state, attempts=attempts, error=error)
    if state == "sent":
        logger.info("export %s: %s notification sent (attempt %d)", ended.id, channel, attempts)
    else:
        logger.warning("export %s: %s notification failed after %d attempt(s): %s", ended.id, channel, attempts, error)


def _webhook_client(config: NotifyConfig) -> httpx.AsyncClient:
    """The client of one job's webhook (one host: a pooled connection never carries another host's name)."""
    return httpx.AsyncClient(
        timeout=config.timeout_s,
        follow_redirects=False,  # a redirect is an answer (not 2xx), never a second destination
        trust_env=False,  # no proxy variables nor .netrc for a host an export request chose
        verify=httpx.create_ssl_context(trust_env=True),  # SSL_CERT_FILE / SSL_CERT_DIR still set the CAs
    )


async def deliver(ended: Ended, *, config: NotifyConfig, log: NotificationLog) -> None:
    """Send every notification the job asked for, channels side by side; returns when each is sent or given up."""
    runs: list[Awaitable[None]] = []
    client: httpx.AsyncClient | None = None
    for channel, target in ended.targets.items():
        send: Callable[[], Awaitable[_Failure | None]]
        if channel == "email":
            send = functools.partial(_mail, ended, target, config)
        else:
            client = client or _webhook_client(config)
            send = functools.partial(_post, ended, target, config, client)
        runs.append(_deliver_channel(ended, channel, send, config=config, log=log))
    try:
        await asyncio.gather(*runs)
    finally:
        if client is not None:
            await client.aclose()


class Notifier:
    """Delivers, as tasks on this process's event loop, the notifications of the jobs it ended (the ingress:
    sweeper, readers, a task that could not start)."""

    def __init__(self, client: aioredis.Redis, config: NotifyConfig) -> None:
        self._log = NotificationLog(client)
        self._config = config
        self._tasks: set[asyncio.Task[None]] = set()

    def job_ended(self, job: Job) -> None:
        """Start delivering the notifications ``job`` asked for (if any) and return at once."""
        ended = Ended.from_job(job)
        if not ended.targets:
            return
        task = asyncio.create_task(deliver(ended, config=self._config, log=self._log), name="export-notify")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop the deliveries still running (at shutdown); each records itself failed, interrupted."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_threads_lock = threading.Lock()
_threads: dict[threading.Thread, float] = {}  # delivery thread -> time.monotonic() deadline


def deliver_in_background(ended: Ended, *, config: NotifyConfig, redis_url: str) -> None:
    """Deliver in a daemon thread of this process, with its own event loop and Redis client (the runner's way:
    the export task waits for it with :func:`wait_for_deliveries`)."""
    if not ended.targets:
        return

    def run() -> None:
        async def main() -> None:
            client = aioredis.Redis.from_url(
                redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=3
            )
            try:
                await deliver(ended, config=config, log=NotificationLog(client))
            finally:
                await client.aclose()

        try:
            asyncio.run(main())
        except Exception:
            logger.exception("export %s: notification delivery broke off", ended.id)

    thread = threading.Thread(target=run, name="export-notify", daemon=True)
    with _threads_lock:
        _threads[thread] = time.monotonic() + config.limit_s
    thread.start()


def wait_for_deliveries() -> None:
    """Block until every background delivery of this process has ended, or passed its hard limit."""
    with _threads_lock:
        pending = list(_threads.items())
    for thread, deadline in pending:
        thread.join(max(0.0, deadline - time.monotonic()))
    with _threads_lock:
        for thread in [t for t in _threads if not t.is_alive() or _threads[t] < time.monotonic()]:
            del _threads[thread]


__all__ = [
    "Ended",
    "Notifier",
    "NotifyConfig",
    "deliver",
    "deliver_in_background",
    "verify_signature",
    "wait_for_deliveries",
]
