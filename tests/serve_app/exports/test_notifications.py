"""Export notifications: e-mail through a real SMTP server (aiosmtpd) and signed webhooks to a real HTTP
receiver, for completed and failed exports (the runner's and the sweeper's), with retries, as the job status
shows them; the ``notify`` field's validation.

Most cases run the app in process with the real runner in a thread (what the Ray task does, without Ray);
one runs through Serve and a Ray task."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import datetime as dt
import email
import email.policy
import io
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from serve_app.config import PLACEHOLDER_SECRET, Settings
from serve_app.exports import notify, scripts
from serve_app.exports.addresses import is_public, pinned
from serve_app.exports.jobs import JobStore, NotificationLog, RunnerLease, notification
from serve_app.exports.notify import Ended, NotifyConfig, deliver, verify_signature, wait_for_deliveries
from serve_app.exports.signature import EVENT_HEADER, SIGNATURE_HEADER, sign
from tests import factories
from tests.fixtures.ray_cluster import app_settings, free_port
from tests.helpers import ThreadQueue, auth, export_body
from tests.waiting import wait_until, wait_until_async

SECRET = "webhook-test-secret"
ADDRESS = "biologist@example.org"
TODAY = dt.datetime.now(dt.UTC).date()
T = TypeVar("T")


# --- a real SMTP server and a real webhook receiver on 127.0.0.1 ---------------------------------------------


class Inbox:
    """The aiosmtpd handler: keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield inbox, controller.port
    controller.stop()


@dataclass
class Delivery:
    """One POST the receiver got."""

    at: float
    headers: dict[str, str]
    body: bytes
    verified: bool


@dataclass
class Receiver:
    """A webhook endpoint: answers ``statuses`` in turn (then 200), verifies each signature, records each POST.
    ``hold`` (when set) keeps the answer to POST number ``hold_at`` until the test sets it."""

    secret: str = SECRET
    statuses: list[int] = field(default_factory=list)
    hold_at: int | None = None
    hold: threading.Event = field(default_factory=threading.Event)
    deliveries: list[Delivery] = field(default_factory=list)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                verified = verify_signature(receiver.secret, self.headers.get(SIGNATURE_HEADER), body)
                receiver.deliveries.append(Delivery(time.monotonic(), dict(self.headers.items()), body, verified))
                if receiver.hold_at == len(receiver.deliveries):
                    receiver.hold.wait(30)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@contextlib.contextmanager
def receiving(receiver: Receiver, *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """Serve ``receiver`` on 127.0.0.1 at a free port, over TLS with ``tls``; yields its URL, naming ``host``
    (with a query the status must not show)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver.handler())
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://{host}:{server.server_port}/hooks/export?token=abc"
    finally:
        receiver.hold.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@dataclass(frozen=True)
class LocalhostTLS:
    """A CA (``ca_file``, PEM) and a server context whose certificate it signed for the name localhost only."""

    ca_file: Path
    server: ssl.SSLContext


@pytest.fixture
def localhost_tls(tmp_path: Path) -> LocalhostTLS:
    now = dt.datetime.now(dt.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        certificate("webhook test CA", ca_key, "webhook test CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        certificate("localhost", server_key, "webhook test CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, chain_file, key_file = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server-key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(chain_file, key_file)
    return LocalhostTLS(ca_file=ca_file, server=server)


# --- the app in process, its runner in a thread --------------------------------------------------------------


def run_app(
    settings: dict[str, Any],
    scenario: Callable[[httpx.AsyncClient], Awaitable[T]],
    *,
    start: bool | Literal["refuse"] = True,
) -> T:
    from serve_app.ingress import create_app

    queue = ThreadQueue(Settings(**settings), start=start)
    app = create_app(settings, export_queue=queue)

    async def main() -> T:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:
                result = await scenario(client)
            await asyncio.gather(*queue.runs)
            return result

    return asyncio.run(main())


@pytest.fixture(autouse=True)
def no_delivery_left_running() -> Iterator[None]:
    """A runner's deliveries go on in threads of this process: none may outlive its test (nor its Redis db)."""
    yield
    wait_for_deliveries()


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path, smtp_server: tuple[Inbox, int]) -> dict[str, Any]:
    """Settings of an app that mails through the test SMTP server, with quick retries."""
    return app_settings(
        database_url,
        redis_url,
        tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=smtp_server[1],
        smtp_from="exports@trailcam.test",
        webhook_secret=SECRET,
        notify_attempts=3,
        notify_backoff_s=0.2,
        notify_timeout_s=5.0,
    )


@dataclass
class Site:
    key: dict[str, str]
    camera: int


@pytest.fixture
def site(db: psycopg.Connection[Any]) -> Site:
    """A site with one camera and three detections in the last days, and a key for it."""
    site_id = factories.site(db)
    camera = factories.camera(db, site_id=site_id)
    for days_ago in (1, 2, 3):
        when = dt.datetime.combine(TODAY - dt.timedelta(days=days_ago), dt.time(12), tzinfo=dt.UTC)
        factories.detection(db, image_id=factories.image(db, camera_id=camera, captured_at=when))
    return Site(key=auth(factories.api_key(db, sites=[site_id])), camera=camera)


async def job_when(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], condition: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """Poll the job status until ``condition`` holds; every poll answers 200."""

    async def probe() -> dict[str, Any] | None:
        resp = await client.get(url, headers=headers)
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        return job if condition(job) else None

    found: dict[str, Any] = await wait_until_async(probe, what=what, timeout_s=60)
    return found


def settled(job: dict[str, Any]) -> bool:
    """Ended, and every notification sent or given up."""
    return job["status"] != "processing" and all(n["state"] != "pending" for n in job["notifications"])


def states(job: dict[str, Any]) -> list[tuple[str, str, str, int, str | None]]:
    return [(n["channel"], n["target"], n["state"], n["attempts"], n["error"]) for n in job["notifications"]]


def public_url(url: str) -> str:
    return url.split("?", 1)[0]


def job_keys(client: redis.Redis) -> list[str]:
    return [str(k) for k in client.scan_iter(scripts.JOB_PREFIX + "*")]


# --- completed and failed exports ----------------------------------------------------------------------------


def test_a_completed_export_sends_one_email_and_one_signed_webhook(
    settings: dict[str, Any], site: Site, smtp_server: tuple[Inbox, int]
) -> None:
    inbox, _ = smtp_server
    receiver = Receiver()
    with receiving(receiver) as url:
        body = export_body("csv", days=10, group_by="day", notify={"email": ADDRESS, "webhook_url": url})

        async def scenario(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any], str]:
            created = await client.post("/api/exports", json=body, headers=site.key)
            assert created.status_code == 202, created.text
            assert states(created.json()) == [
                ("email", ADDRESS, "pending", 0, None),
                ("webhook", public_url(url), "pending", 0, None),
            ]
            location = created.headers["location"]
            job = await job_when(client, location, site.key, settled, "the export and its notifications to end")
            download = await client.get(job["download_url"], headers=site.key)
            assert download.status_code == 200
            return created.json(), job, download.text

        created, job, content = run_app(settings, scenario)

    assert job["status"] == "completed"
    assert states(job) == [("email", ADDRESS, "sent", 1, None), ("webhook", public_url(url), "sent", 1, None)]
    assert "notify" not in job["params"] and "token" not in json.dumps(job)
    rows = list(csv.DictReader(io.StringIO(content)))
    assert sum(int(r["detections"]) for r in rows) == 3

    (recipients, message), *more_mail = inbox.messages
    assert not more_mail
    assert recipients == [ADDRESS]
    assert (message["From"], message["To"]) == ("exports@trailcam.test", ADDRESS)
    assert message["Subject"] == f"trailcam-reid export completed: {job['id']}"
    text = message.get_content()
    assert f"export {job['id']} has completed" in text
    assert f"Rows: {len(rows)}" in text
    assert f"Download: /api/exports/{job['id']}/download" in text

    (delivery,) = receiver.deliveries
    assert delivery.verified
    assert delivery.headers[EVENT_HEADER] == "export.completed"
    assert delivery.headers["Content-Type"] == "application/json"
    sent = json.loads(delivery.body)
    assert sent == {
        "id": job["id"],
        "event": "export.completed",
        "status": "completed",
        "format": "csv",
        "finished_at": job["finished_at"],
        "download_url": f"/api/exports/{job['id']}/download",
        "error": None,
        "rows": len(rows),
        "params": job["params"],
    }
    header = delivery.headers[SIGNATURE_HEADER]
    tampered = delivery.body.replace(b'"completed"', b'"failed"')
    assert not verify_signature(SECRET, header, tampered)
    assert not verify_signature("another-secret", header, delivery.body)
    assert created["id"] == job["id"]


def test_a_failed_export_sends_its_error_line_by_email_and_webhook(
    settings: dict[str, Any], db: psycopg.Connection[Any], smtp_server: tuple[Inbox, int]
) -> None:
    inbox, _ = smtp_server
    site_id = factories.site(db)
    row = db.execute("INSERT INTO cameras (site_id, name) VALUES (%s, 'nowhere') RETURNING id", (site_id,)).fetchone()
    factories.image(db, camera_id=row["id"], captured_at=dt.datetime.combine(TODAY, dt.time(1), tzinfo=dt.UTC))
    key = auth(factories.api_key(db, sites=[site_id]))
    receiver = Receiver()
    with receiving(receiver) as url:
        body = export_body("camtrap-dp", days=5, notify={"email": ADDRESS, "webhook_url": url})

        async def scenario(client: httpx.AsyncClient) -> dict[str, Any]:
            created = await client.post("/api/exports", json=body, headers=key)
            assert created.status_code == 202, created.text
            return await job_when(client, created.headers["location"], key, settled, "the failed export's notices")

        job = run_app(settings, scenario)

    error = f"camera {row['id']} (nowhere) has no coordinates; Camtrap DP requires them"
    assert (job["status"], job["error"], job["download_url"]) == ("failed", error, None)
    assert states(job) == [("email", ADDRESS, "sent", 1, None), ("webhook", public_url(url), "sent", 1, None)]
    ((recipients, message),) = inbox.messages
    assert recipients == [ADDRESS] and message["Subject"] == f"trailcam-reid export failed: {job['id']}"
    assert f"Error: {error}" in message.get_content()
    (delivery,) = receiver.deliveries
    assert delivery.verified and delivery.headers[EVENT_HEADER] == "export.failed"
    sent = json.loads(delivery.body)
    assert (sent["status"], sent["error"], sent["download_url"], sent["format"]) == (
        "failed",
        error,
        None,
        "camtrap-dp",
    )


def test_a_receiver_answering_503_is_retried_with_backoff_while_the_export_stays_downloadable(
    settings: dict[str, Any], site: Site
) -> None:
    receiver = Receiver(statuses=[503, 503], hold_at=3)  # the third POST waits until the test has looked
    with receiving(receiver) as url:
        body = export_body("json", days=10, notify={"webhook_url": url})

        async def scenario(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
            created = await client.post("/api/exports", json=body, headers=site.key)
            location = created.headers["location"]
            await wait_until_async(lambda: len(receiver.deliveries) == 3, what="the third try", timeout_s=60)
            retrying = (await client.get(location, headers=site.key)).json()
            download = await client.get(retrying["download_url"], headers=site.key)
            assert download.status_code == 200 and json.loads(download.content)
            receiver.hold.set()
            return retrying, await job_when(client, location, site.key, settled, "the webhook to be sent")

        retrying, job = run_app(settings, scenario)

    assert retrying["status"] == "completed"
    assert states(retrying) == [("webhook", public_url(url), "pending", 2, "HTTP 503 Service Unavailable")]
    assert job["status"] == "completed" and job["error"] is None
    assert states(job) == [("webhook", public_url(url), "sent", 3, None)]
    first, second, third = receiver.deliveries
    assert all(d.verified for d in receiver.deliveries)
    assert first.body == second.body == third.body  # one event, re-signed per try
    assert second.at - first.at >= 0.2 and third.at - second.at >= 0.4  # notify_backoff_s, then doubled


def test_receivers_that_are_down_end_failed_after_every_try_and_the_export_stays_completed(
    settings: dict[str, Any], site: Site
) -> None:
    down_webhook = f"http://127.0.0.1:{free_port()}/hook"
    settings = {**settings, "smtp_port": free_port()}  # nothing listens on either
    body = export_body("csv", days=10, notify={"email": ADDRESS, "webhook_url": down_webhook})

    async def scenario(client: httpx.AsyncClient) -> tuple[dict[str, Any], int]:
        created = await client.post("/api/exports", json=body, headers=site.key)
        job = await job_when(client, created.headers["location"], site.key, settled, "both notifications to fail")
        download = await client.get(job["download_url"], headers=site.key)
        return job, download.status_code

    job, download_status = run_app(settings, scenario)
    assert (job["status"], job["error"], download_status) == ("completed", None, 200)
    (mail, hook) = job["notifications"]
    assert (mail["channel"], mail["state"], mail["attempts"]) == ("email", "failed", 3)
    assert "ConnectionRefusedError" in mail["error"]
    assert (hook["channel"], hook["target"], hook["state"], hook["attempts"]) == ("webhook", down_webhook, "failed", 3)
    assert "ConnectError" in hook["error"]


def test_a_receiver_refusing_with_4xx_is_not_retried(settings: dict[str, Any], site: Site) -> None:
    receiver = Receiver(statuses=[410])
    with receiving(receiver) as url:
        body = export_body("csv", days=10, notify={"webhook_url": url})

        async def scenario(client: httpx.AsyncClient) -> dict[str, Any]:
            created = await client.post("/api/exports", json=body, headers=site.key)
            return await job_when(client, created.headers["location"], site.key, settled, "the webhook to fail")

        job = run_app(settings, scenario)
    assert job["status"] == "completed"
    assert states(job) == [("webhook", public_url(url), "failed", 1, "HTTP 410 Gone")]
    assert len(receiver.deliveries) == 1


def test_a_job_the_sweeper_fails_is_announced_by_the_sweeper(
    settings: dict[str, Any], site: Site, smtp_server: tuple[Inbox, int]
) -> None:
    inbox, _ = smtp_server
    settings = {**settings, "export_start_grace_s": 0.3, "export_sweep_interval_s": 0.1}
    receiver = Receiver()
    with receiving(receiver) as url:
        body = export_body("csv", days=10, notify={"email": ADDRESS, "webhook_url": url})

        async def scenario(client: httpx.AsyncClient) -> dict[str, Any]:
            created = await client.post("/api/exports", json=body, headers=site.key)
            assert created.status_code == 202, created.text
            # Nothing reads the job meanwhile: only the sweeper can fail it and send these.
            await wait_until_async(
                lambda: receiver.deliveries and inbox.messages, what="the sweeper's notifications", timeout_s=60
            )
            return await job_when(client, created.headers["location"], site.key, settled, "the records")

        job = run_app(settings, scenario, start=False)

    assert (job["status"], job["error"]) == ("failed", scripts.WORKER_LOST)
    assert states(job) == [("email", ADDRESS, "sent", 1, None), ("webhook", public_url(url), "sent", 1, None)]
    (delivery,) = receiver.deliveries
    assert delivery.verified and delivery.headers[EVENT_HEADER] == "export.failed"
    assert json.loads(delivery.body)["error"] == scripts.WORKER_LOST
    ((_, message),) = inbox.messages
    assert f"Error: {scripts.WORKER_LOST}" in message.get_content()


def test_a_job_whose_task_cannot_start_is_announced_by_the_ingress(settings: dict[str, Any], site: Site) -> None:
    receiver = Receiver()
    with receiving(receiver) as url:
        body = export_body("csv", days=10, notify={"webhook_url": url})

        async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, dict[str, Any]]:
            refused = await client.post("/api/exports", json=body, headers=site.key)
            await wait_until_async(lambda: receiver.deliveries, what="the webhook", timeout_s=60)
            job_id = json.loads(receiver.deliveries[0].body)["id"]
            return refused, await job_when(client, f"/api/exports/{job_id}", site.key, settled, "the record")

        refused, job = run_app(settings, scenario, start="refuse")

    assert refused.status_code == 503
    assert (job["status"], job["error"]) == ("failed", "could not start the export task")
    assert states(job) == [("webhook", public_url(url), "sent", 1, None)]
    (delivery,) = receiver.deliveries
    assert delivery.verified and delivery.headers[EVENT_HEADER] == "export.failed"


# --- the notify field ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("smtp", "notify", "expected"),
    [
        (True, {"email": "not-an-address"}, {("VR-006", "notify.email")}),
        (True, {"email": "two@@example.org"}, {("VR-006", "notify.email")}),
        (True, {"email": 42}, {("VR-006", "notify.email")}),
        (True, {"webhook_url": "ftp://example.org/hook"}, {("VR-007", "notify.webhook_url")}),
        (True, {"webhook_url": "https:///no-host"}, {("VR-007", "notify.webhook_url")}),
        (True, {"webhook_url": "example.org/hook"}, {("VR-007", "notify.webhook_url")}),
        (False, {"email": ADDRESS}, {("VR-008", "notify.email")}),
        ("", {"email": ADDRESS}, {("VR-008", "notify.email")}),
        (
            False,
            {"email": "nope", "webhook_url": "mailto:x@y.org"},
            {
                ("VR-006", "notify.email"),
                ("VR-008", "notify.email"),
                ("VR-007", "notify.webhook_url"),
            },
        ),
        (True, "yes", {("format", "notify")}),
        (True, {}, {("missing_field", "notify")}),
        (True, {"sms": "+1555"}, {("unknown_field", "notify.sms")}),
    ],
)
def test_a_notify_that_cannot_be_used_answers_422_with_its_rules_and_creates_no_job(
    settings: dict[str, Any],
    site: Site,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    smtp: bool | str,
    notify: Any,
    expected: set[Any],
) -> None:
    """``smtp``: the test SMTP server (True), none (False), or TRAILCAM_SMTP_HOST set to that string."""
    if smtp is False:
        settings = {**settings, "smtp_host": None}
    elif isinstance(smtp, str):
        monkeypatch.setenv("TRAILCAM_SMTP_HOST", smtp)
        settings = {k: v for k, v in settings.items() if k != "smtp_host"}

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/api/exports", json=export_body(notify=notify), headers=site.key)

    resp = run_app(settings, scenario, start=False)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert (problem["status"], problem["code"]) == (422, "notify-invalid")
    assert {(e["rule"], e["field"]) for e in problem["errors"]} == expected
    if ("VR-008", "notify.email") in expected:
        assert "e-mail notifications are not configured" in problem["detail"]
    assert job_keys(redis_client) == []


def test_a_notify_failure_is_listed_with_the_exports_own_in_a_400(
    settings: dict[str, Any], site: Site, redis_client: redis.Redis
) -> None:
    body = export_body(start_date=str(TODAY), end_date=str(TODAY), notify={"webhook_url": "gopher://x"})

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/api/exports", json=body, headers=site.key)

    resp = run_app(settings, scenario, start=False)
    assert resp.status_code == 400, resp.text
    assert {(e["rule"], e["field"]) for e in resp.json()["errors"]} == {
        ("VR-001", "end_date"),
        ("VR-007", "notify.webhook_url"),
    }
    assert job_keys(redis_client) == []


def test_notify_is_part_of_the_idempotency_fingerprint(
    settings: dict[str, Any], site: Site, redis_client: redis.Redis
) -> None:
    first = export_body(notify={"webhook_url": "https://hooks.example.org/a"})
    other = export_body(notify={"webhook_url": "https://hooks.example.org/b"})
    headers = {**site.key, "Idempotency-Key": "same-key"}

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.post("/api/exports", json=b, headers=headers) for b in (first, first, other)]

    created, replay, clash = run_app(settings, scenario, start=False)
    assert created.status_code == replay.status_code == 202
    assert created.json()["id"] == replay.json()["id"]
    assert (clash.status_code, clash.json()["code"]) == (422, "idempotency-key-reused")
    assert len(job_keys(redis_client)) == 1


def test_openapi_documents_notify_and_the_notifications_of_a_job(settings: dict[str, Any]) -> None:
    async def scenario(client: httpx.AsyncClient) -> dict[str, Any]:
        spec: dict[str, Any] = (await client.get("/openapi.json")).json()
        return spec

    spec = run_app(settings, scenario, start=False)
    post = spec["paths"]["/api/exports"]["post"]
    notify = post["requestBody"]["content"]["application/json"]["schema"]["properties"]["notify"]
    assert set(notify["anyOf"][0]["properties"]) == {"email", "webhook_url"}
    assert "$ref" not in json.dumps(post["requestBody"])  # no reference into a $defs the document lacks
    assert "notify-invalid" in post["responses"]["422"]["description"]
    view = spec["components"]["schemas"]["ExportJobView"]
    assert "notifications" in view["required"]
    item = spec["components"]["schemas"]["NotificationView"]
    assert set(item["properties"]) == {"channel", "target", "state", "attempts", "error", "updated_at"}
    assert item["properties"]["state"]["enum"] == ["pending", "sent", "failed"]


# --- the pieces ----------------------------------------------------------------------------------------------


def test_verify_signature_accepts_only_the_signed_body_within_the_tolerance() -> None:
    body = b'{"id":"x","status":"completed"}'
    header = sign(SECRET, body, timestamp=1_700_000_000)
    now = 1_700_000_100
    assert verify_signature(SECRET, header, body, now=now)
    assert verify_signature(SECRET, header, body.decode(), now=now)
    assert not verify_signature(SECRET, header, body + b" ", now=now)
    assert not verify_signature("wrong", header, body, now=now)
    assert not verify_signature(SECRET, header, body, now=1_700_000_000 + 301)
    assert verify_signature(SECRET, header, body, tolerance_s=600, now=1_700_000_000 + 301)
    digest = header.split("v1=")[1]
    assert verify_signature(SECRET, f"t=1700000000,v1={'0' * 64},v1={digest}", body, now=now)  # a rotated secret
    for broken in (None, "", "v1=" + digest, "t=1700000000", "t=soon,v1=" + digest, "t=\u00b2,v1=" + digest, "t=1,v1"):
        assert not verify_signature(SECRET, broken, body, now=now), broken
    assert not verify_signature(SECRET, f"t=1700000001,v1={digest}", body, now=now)  # the time is signed too


def _smtp_config(port: int, **overrides: Any) -> NotifyConfig:
    base = NotifyConfig.from_settings(Settings(smtp_host="127.0.0.1", smtp_port=port, webhook_secret=SECRET))
    return dataclasses.replace(base, attempts=3, backoff_s=0.05, timeout_s=5.0, **overrides)


def _email_record(redis_url: str, config: NotifyConfig, *, notify: dict[str, str] | None = None) -> dict[str, Any]:
    """Deliver the e-mail (or ``notify``) of a freshly completed job straight through ``deliver``; returns its
    record."""
    params = {"start_date": "2024-01-01", "end_date": "2024-02-01", "group_by": "day", "format": "csv"}

    async def scenario() -> dict[str, Any]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        sync = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            store = JobStore(client, status_ttl_s=60, start_grace_s=30)
            _, job = await store.create(
                owner=1, params=params, file_uri_for=lambda j: f"/tmp/{j}.csv", notify=notify or {"email": ADDRESS}
            )
            assert job is not None
            assert RunnerLease(sync, job.id, lease_s=5).finish("completed", download_url="/x", rows=2)
            ended, _ = await store.read(job.id)
            assert ended is not None
            await deliver(Ended.from_job(ended), config=config, log=NotificationLog(client))
            final, _ = await store.read(job.id)
            assert final is not None
            (record,) = final.public()["notifications"]
            return dict(record)
        finally:
            sync.close()
            await client.aclose()

    return asyncio.run(scenario())


def test_smtp_login_and_starttls_follow_the_settings(redis_url: str, redis_client: redis.Redis) -> None:
    inbox = Inbox()

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"field", b"right")
        return AuthResult(success=ok, handled=False)

    controller = Controller(
        inbox, hostname="127.0.0.1", port=free_port(), authenticator=authenticator, auth_require_tls=False
    )
    controller.start()
    try:
        logged_in = _email_record(
            redis_url, _smtp_config(controller.port, smtp_username="field", smtp_password="right")
        )
        refused = _email_record(redis_url, _smtp_config(controller.port, smtp_username="field", smtp_password="wrong"))
        no_tls = _email_record(redis_url, _smtp_config(controller.port, smtp_starttls=True))
    finally:
        controller.stop()
    assert (logged_in["state"], logged_in["attempts"], logged_in["error"]) == ("sent", 1, None)
    assert len(inbox.messages) == 1  # only the logged-in one; neither failure is sent
    assert (refused["state"], refused["attempts"]) == ("failed", 1)  # 5xx: not tried again
    assert refused["error"].startswith("SMTP 535") and "wrong" not in refused["error"]
    assert (no_tls["state"], no_tls["attempts"]) == ("failed", 1)
    assert "STARTTLS" in no_tls["error"]


def test_a_webhook_to_a_private_address_is_refused_unless_allowed(redis_url: str, redis_client: redis.Redis) -> None:
    receiver = Receiver(secret=SECRET)
    with receiving(receiver) as url:
        config = dataclasses.replace(_smtp_config(1), private_targets=False)
        refused = _email_record(redis_url, config, notify={"webhook": url})
        assert (refused["state"], refused["attempts"]) == ("failed", 1)  # not tried again
        assert refused["error"].startswith("refused: 127.0.0.1 is not a public address")
        nat64 = url.replace("127.0.0.1", "[64:ff9b::7f00:1]")  # NAT64 of 127.0.0.1
        wrapped = _email_record(redis_url, config, notify={"webhook": nat64})
        assert (wrapped["state"], wrapped["attempts"]) == ("failed", 1)
        assert wrapped["error"].startswith("refused: 64:ff9b::7f00:1 is not a public address")
        assert receiver.deliveries == []
        allowed = _email_record(redis_url, dataclasses.replace(config, private_targets=True), notify={"webhook": url})
        assert (allowed["state"], allowed["attempts"]) == ("sent", 1)
        assert len(receiver.deliveries) == 1 and receiver.deliveries[0].verified


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("::1", False),
        # IPv4-mapped: the IPv4 address itself
        ("::ffff:8.8.8.8", True),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.1.2.3", False),
        # 6to4: bits 16-47
        ("2002:808:808::1", True),
        ("2002:7f00:1::", False),
        ("2002:c0a8:101::1", False),  # 192.168.1.1
        # NAT64, well-known prefix: the low 32 bits
        ("64:ff9b::808:808", True),
        ("64:ff9b::7f00:1", False),
        ("64:ff9b::a9fe:a9fe", False),  # 169.254.169.254, a cloud's metadata service
        # local-use NAT64 and IPv4-compatible: never public
        ("64:ff9b:1::808:808", False),
        ("::808:808", False),
    ],
)
def test_the_address_check_reads_the_ipv4_address_an_ipv6_one_wraps(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


def test_a_pinned_webhook_request_names_the_checked_address_and_keeps_the_rest_of_the_url() -> None:
    https = pinned("https://user:pw@Hooks.Example.org:8443/a/b?x=1&y=2", ipaddress.ip_address("93.184.216.34"))
    assert https.url == "https://user:pw@93.184.216.34:8443/a/b?x=1&y=2"
    assert https.headers == {"Host": "hooks.example.org:8443"}
    assert https.extensions == {"sni_hostname": "hooks.example.org"}  # TLS names and checks the real host
    http = pinned("http://hooks.example.org/x", ipaddress.ip_address("2001:db8::1"))
    assert (http.url, http.headers, http.extensions) == ("http://[2001:db8::1]/x", {"Host": "hooks.example.org"}, {})


def test_a_webhook_connects_to_the_address_it_resolved_under_its_own_host_name(
    redis_url: str, redis_client: redis.Redis, localhost_tls: LocalhostTLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver's certificate names localhost and no address: the request goes to 127.0.0.1 and still
    # verifies the name, and sends it as Host.
    monkeypatch.setenv("SSL_CERT_FILE", str(localhost_tls.ca_file))  # the webhook client's trusted CA
    receiver = Receiver()
    config = dataclasses.replace(_smtp_config(1), attempts=1, private_targets=True)
    with receiving(receiver, host="localhost", tls=localhost_tls.server) as url:
        sent = _email_record(redis_url, config, notify={"webhook": url})
        by_address = _email_record(redis_url, config, notify={"webhook": url.replace("localhost", "127.0.0.1")})
    assert (sent["state"], sent["attempts"], sent["error"]) == ("sent", 1, None)
    (delivery,) = receiver.deliveries
    assert delivery.verified and delivery.headers["Host"] == f"localhost:{httpx.URL(url).port}"
    assert by_address["state"] == "failed" and "CERTIFICATE_VERIFY_FAILED" in by_address["error"]


def test_a_webhook_never_looks_its_host_up_a_second_time(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A name only the checked lookup knows (.invalid never resolves): the request reaches the receiver only if
    # it goes to the address that lookup gave, not to one the HTTP client would look up again (DNS rebinding).
    async def checked_lookup(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        assert host == "hook.rebind.invalid"
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(notify, "resolve", checked_lookup)
    receiver = Receiver()
    config = dataclasses.replace(_smtp_config(1), attempts=1, private_targets=True)
    with receiving(receiver) as url:
        port = httpx.URL(url).port
        sent = _email_record(redis_url, config, notify={"webhook": f"http://hook.rebind.invalid:{port}/hook"})
    assert (sent["state"], sent["attempts"], sent["error"]) == ("sent", 1, None)
    (delivery,) = receiver.deliveries
    assert delivery.verified and delivery.headers["Host"] == f"hook.rebind.invalid:{port}"


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_smtp_host_means_no_smtp_server(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    monkeypatch.setenv("TRAILCAM_SMTP_HOST", blank)
    assert Settings().smtp_host is None
    assert NotifyConfig.from_settings(Settings()).smtp_host is None
    monkeypatch.setenv("TRAILCAM_SMTP_HOST", "mail.example.org")
    assert Settings().smtp_host == "mail.example.org"


def test_the_delivery_budget_is_every_try_plus_every_wait() -> None:
    config = NotifyConfig.from_settings(Settings(notify_attempts=4, notify_backoff_s=0.5, notify_timeout_s=2))
    assert config.budget_s == 4 * 2 + 0.5 + 1 + 2
    assert PLACEHOLDER_SECRET not in repr(config)  # secrets stay out of logs


def test_a_notification_record_never_recreates_a_job_nor_touches_one_still_processing(
    redis_url: str, redis_client: redis.Redis
) -> None:
    params = {"start_date": "2024-01-01", "end_date": "2024-02-01", "group_by": "day", "format": "csv"}
    entry = notification("webhook", target="https://h.example.org/x?k=s", state="sent", attempts=1, error=None)

    async def scenario() -> list[bool]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        sync = redis.Redis.from_url(redis_url)
        try:
            store, log = JobStore(client, status_ttl_s=60, start_grace_s=30), NotificationLog(client)
            _, job = await store.create(
                owner=1, params=params, file_uri_for=lambda j: f"/tmp/{j}.csv", notify={"webhook": "https://x.org"}
            )
            assert job is not None
            while_processing = await log.record(job.id, entry)
            assert RunnerLease(sync, job.id, lease_s=5).finish("completed")
            ended = await log.record(job.id, entry)
            await store.delete(job.id, owner=1)
            after_delete = await log.record(job.id, entry)
            return [while_processing, ended, after_delete, await client.exists(scripts.job_key(job.id)) == 1]
        finally:
            sync.close()
            await client.aclose()

    assert asyncio.run(scenario()) == [False, True, False, False]
    assert entry["target"] == "https://h.example.org/x"


# --- through Serve and a Ray task ----------------------------------------------------------------------------


def test_the_ray_task_delivers_a_signed_webhook(serve_url: str, db: psycopg.Connection[Any]) -> None:
    site_id = factories.site(db)
    camera = factories.camera(db, site_id=site_id)
    factories.detection(db, image_id=factories.image(db, camera_id=camera))
    key = auth(factories.api_key(db, sites=[site_id]))
    receiver = Receiver(secret=PLACEHOLDER_SECRET)  # the served test app runs with the development secret
    with receiving(receiver) as url, httpx.Client(base_url=serve_url, timeout=30) as client:
        created = client.post("/api/exports", json=export_body(notify={"webhook_url": url}), headers=key)
        assert created.status_code == 202, created.text

        def done() -> dict[str, Any] | None:
            job: dict[str, Any] = client.get(created.headers["location"], headers=key).json()
            return job if settled(job) else None

        job = wait_until(done, what="the export and its webhook", timeout_s=120, every_s=0.1)
    assert job["status"] == "completed"
    assert states(job) == [("webhook", public_url(url), "sent", 1, None)]
    (delivery,) = receiver.deliveries
    assert delivery.verified and json.loads(delivery.body)["id"] == job["id"]
