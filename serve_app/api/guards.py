"""ASGI middlewares that refuse a request before its body is parsed: too large (413), no valid key (401)."""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.problems import problem_response, retry_later
from serve_app.config import Settings
from serve_app.errors import InvalidKey, ServiceUnavailable
from serve_app.keyring import KeyVerifier

logger = logging.getLogger(__name__)

FORM_OVERHEAD_BYTES = 64_000
"""Room for the multipart boundaries and small form fields around an image upload, bytes."""
UPLOAD_PATH = "/api/detections"
API_PREFIX = "/api/"


def route_path(scope: Scope) -> str:
    """The request path inside the app (Serve puts its route prefix in both root_path and path)."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key.lower() == name), None)


def body_limit(scope: Scope, settings: Settings) -> tuple[int, str]:
    """The largest body this request may send, bytes, and the problem code that refuses more."""
    content_type = (_header(scope, b"content-type") or b"").lower()
    if route_path(scope) == UPLOAD_PATH and content_type.startswith(b"multipart/form-data"):
        return settings.max_upload_bytes + FORM_OVERHEAD_BYTES, "upload-too-large"
    return settings.max_json_body_bytes, "body-too-large"


class LimitBody:
    """Refuses a body over its route's limit with 413 problem+json: a declared Content-Length at once, a
    chunked body as soon as the bytes counted while streaming pass the limit; nothing beyond it is read."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, code = body_limit(scope, self.settings)
        detail = f"the body exceeds {limit} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await problem_response(413, code, detail, instance=scope["path"])(scope, receive, send)
            return
        if declared is None:
            # Unknown length: read up to the limit before the route runs, so an oversized stream is refused
            # after the fewest bytes whatever the route reads; the app then replays what was read.
            buffered, over = await _read_up_to(receive, limit)
            if over:
                await problem_response(413, code, detail, instance=scope["path"])(scope, receive, send)
                return
            receive = _replay(buffered, receive)
        received = 0
        refused = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await problem_response(413, code, detail, instance=scope["path"])(scope, receive, send)
                    # The app sees a client that went away: it stops reading and its answer is dropped.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            logger.debug("request stopped after its body passed %d bytes", limit)


async def _read_up_to(receive: Receive, limit: int) -> tuple[list[Message], bool]:
    """The body's messages while they total at most ``limit`` bytes; True once they pass it (reading stops)."""
    messages: list[Message] = []
    total = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False
        total += len(message.get("body", b""))
        if total > limit:
            return [], True
        if not message.get("more_body", False):
            return messages, False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that returns ``messages`` first, then reads on."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class RequireKey:
    """Verifies the bearer key of every /api request before the route parses anything, so an anonymous or
    invalid caller gets 401 (or 503 when keys cannot be checked) and learns nothing from validation errors.
    The principal is left in the request state for the routes' dependency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
        try:
            if scheme.lower() != b"bearer" or not token.strip():
                raise InvalidKey("missing API key: send 'Authorization: Bearer <key>'")
            keys: KeyVerifier = scope["app"].state.resources.keys
            principal = await keys.verify(token.strip().decode("latin-1"))
        except InvalidKey as exc:
            headers = {"WWW-Authenticate": "Bearer"}
            response = problem_response(401, "unauthorized", str(exc), headers=headers, instance=scope["path"])
            await response(scope, receive, send)
            return
        except ServiceUnavailable as exc:
            response = problem_response(
                503,
                "service-unavailable",
                str(exc),
                headers=retry_later(),
                instance=scope["path"],
                extra={"services": [exc.service]},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)
