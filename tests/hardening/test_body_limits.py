"""Body limits through the real Serve app: an oversized body is refused with 413 problem+json while it is still
being sent (declared or chunked, JSON or multipart), without the ingress replica's memory growing; a body from
a caller without a valid key is refused before it is parsed."""

from __future__ import annotations

import http.client
import json
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg
import pytest
import ray

from tests import factories

MB = 1_000_000
TOTAL = 100 * MB
CHUNK = 64 * 1024
PROBLEM = "application/problem+json"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int

    def problem(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith(PROBLEM), (self.status, self.headers, self.body[:300])
        value: dict[str, Any] = json.loads(self.body)
        return value


def _answered(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def stream_post(
    base_url: str,
    path: str,
    *,
    headers: dict[str, str],
    parts: Iterator[bytes],
    length: int | None,
    pause_after: int | None = None,
) -> Answer:
    """POST ``parts`` (Content-Length when ``length`` is given, chunked otherwise), stopping as soon as the
    server answers, then read the answer: what a client that watches its socket sees. With ``pause_after``
    the client stops sending after that many bytes and waits: only a server that answers without the rest
    of the body answers at all."""
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=60)
    framing = {"Content-Length": str(length)} if length is not None else {"Transfer-Encoding": "chunked"}
    head = [f"POST {path} HTTP/1.1", f"Host: {url.hostname}", *(f"{k}: {v}" for k, v in {**headers, **framing}.items())]
    sent = 0
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for part in parts:
            if _answered(sock) or (pause_after is not None and sent >= pause_after):
                break
            sock.sendall(part if length is not None else b"%x\r\n%s\r\n" % (len(part), part))
            sent += len(part)
        else:
            if length is None:
                sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: read its answer below
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        body = response.read()
    finally:
        sock.close()
    return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body, sent)


def filler(total: int, *, prefix: bytes = b"", suffix: bytes = b"") -> Iterator[bytes]:
    """``total`` bytes: prefix, spaces, suffix, in chunks (never held whole)."""
    yield prefix
    left = total - len(prefix) - len(suffix)
    block = b" " * CHUNK
    while left > 0:
        yield block[: min(CHUNK, left)]
        left -= CHUNK
    yield suffix


def json_parts(total: int) -> Iterator[bytes]:
    return filler(total, prefix=b'{"detections": [', suffix=b"]}")


BOUNDARY = "trailcamboundary"


def multipart_parts(total: int, *, camera_id: int = 1) -> Iterator[bytes]:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="camera_id"\r\n\r\n{camera_id}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="captured_at"\r\n\r\n2024-05-01T06:30:00Z\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="bbox"\r\n\r\n'
        '{"x": 0.1, "y": 0.1, "w": 0.2, "h": 0.2}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return filler(total, prefix=head + b"\xff\xd8", suffix=f"\r\n--{BOUNDARY}--\r\n".encode())


def ingress_private_bytes() -> int:
    """Private memory (USS) of the test app's ingress replica (one replica, on this node); pages of Ray's
    shared object store that the replica maps are the store's, not the replica's."""
    actors = [
        a
        for a in ray._private.state.actors().values()
        if a["ActorClassName"] == "ServeReplica:trailcam:Ingress" and a["State"] == "ALIVE"
    ]
    assert len(actors) == 1, actors
    return int(psutil.Process(actors[0]["Pid"]).memory_full_info().uss)


@pytest.fixture
def key_headers(db: psycopg.Connection[Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {factories.api_key(db)}"}


def _oversized_requests(key: dict[str, str]) -> list[tuple[str, dict[str, str], Iterator[bytes], int | None]]:
    json_headers = {**key, "Content-Type": "application/json"}
    form_headers = {**key, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return [
        ("/api/detections/batch", json_headers, json_parts(TOTAL), TOTAL),  # declared: refused on its header
        ("/api/detections/batch", json_headers, json_parts(TOTAL), None),  # chunked: refused while counted
        ("/api/exports", json_headers, json_parts(TOTAL), None),
        ("/api/detections", json_headers, json_parts(TOTAL), None),
        ("/api/detections", form_headers, multipart_parts(TOTAL), None),  # a chunked upload
        ("/api/detections", form_headers, multipart_parts(TOTAL), TOTAL),
    ]


def test_a_100_mb_body_gets_413_problem_json_before_it_is_all_sent(serve_url: str, key_headers: dict[str, str]) -> None:
    for path, headers, parts, length in _oversized_requests(key_headers):
        # The client sends 12 MB of its 100 MB (past every limit) and waits: the answer must come without the rest.
        answer = stream_post(serve_url, path, headers=headers, parts=parts, length=length, pause_after=12 * MB)
        kind = "chunked" if length is None else "declared"
        assert answer.status == 413, (path, kind, answer.status, answer.body[:300])
        problem = answer.problem()
        expected = "upload-too-large" if "multipart" in headers["Content-Type"] else "body-too-large"
        assert problem["status"] == 413 and problem["code"] == expected, problem
        assert answer.sent <= 12 * MB + CHUNK, (path, kind, answer.sent)


def test_oversized_bodies_do_not_grow_the_ingress_memory(serve_url: str, key_headers: dict[str, str]) -> None:
    def refuse_all() -> None:
        for path, headers, parts, length in _oversized_requests(key_headers):
            answer = stream_post(serve_url, path, headers=headers, parts=parts, length=length, pause_after=12 * MB)
            assert answer.status == 413, answer.body[:300]

    refuse_all()  # warm: first-use allocations are not growth
    before = ingress_private_bytes()
    for _ in range(3):
        refuse_all()  # 1.8 GB announced or streamed in all
    grown = ingress_private_bytes() - before
    assert grown < 8 * MB, f"the ingress replica grew by {grown / MB:.1f} MB"


def test_a_chunked_upload_under_the_limit_is_read_and_checked(serve_url: str, key_headers: dict[str, str]) -> None:
    headers = {**key_headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    answer = stream_post(
        serve_url, "/api/detections", headers=headers, parts=multipart_parts(2 * MB, camera_id=987_654_321), length=None
    )
    assert answer.status == 404, answer.body[:300]  # past the size check: the camera is looked up
    assert answer.problem()["code"] == "not-found"


def test_a_body_without_a_valid_key_is_refused_before_it_is_parsed(serve_url: str) -> None:
    for token in ("tcr_not-a-key", "tcr_" + "A" * 43):
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        for path in ("/api/detections/batch", "/api/detections", "/api/exports"):
            answer = stream_post(serve_url, path, headers=headers, parts=iter([b"{not json"]), length=9)
            assert answer.status == 401, (path, answer.body[:300])
            assert answer.problem()["code"] == "unauthorized"
