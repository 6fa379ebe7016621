"""What every UI page shares: templates, the signed-in person, the form check and the calls into the public API.

Pages read and change data only through the app's own ``/api`` routes, called in-process with the session's
key: the API's access rules (a key sees only its sites; another site's ids answer 404), validation and
problem+json errors are the pages' too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlencode, urlsplit

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.templating import Jinja2Templates
from starlette.datastructures import FormData
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import Message, Receive, Scope, Send

from serve_app.errors import InvalidKey
from serve_app.keys import Principal
from serve_app.resources import Resources
from serve_app.web.ui.session import COOKIE_NAME, Session, Sessions

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parent.parent / "templates")
INTERNAL_BASE = "http://trailcam.internal"
PASSED_HEADERS = ("content-type", "content-length", "etag", "cache-control", "content-disposition")
RELAYED_REQUEST_HEADERS = ("if-none-match",)
"""The browser's request headers a relayed GET carries to the API (besides the session's key)."""


class SignInRequired(Exception):
    """No valid session: the page answers a redirect to the sign-in form."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class PageError(Exception):
    """A page that cannot be shown: rendered as an error page with the API's status and detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Make the pages' session store and their in-process client of the API when the app starts (after its
    resources are open); close the client at shutdown."""
    resources: Resources = app.state.resources
    settings = resources.settings
    app.state.ui_sessions = Sessions(
        resources.redis, secret=settings.ui_session_secret, ttl_s=settings.ui_session_ttl_s
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=INTERNAL_BASE) as client:
        app.state.ui_api_client = client
        yield


def sessions(request: Request) -> Sessions:
    """The app's session store (made in :func:`lifespan`)."""
    store: Sessions = request.app.state.ui_sessions
    return store


def _client(request: Request) -> httpx.AsyncClient:
    client: httpx.AsyncClient = request.app.state.ui_api_client
    return client


def problem_detail(response: httpx.Response) -> str:
    """The human line of a problem+json answer (or its status line)."""
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} {response.reason_phrase}"
    return str(body.get("detail") or body.get("title") or response.reason_phrase)


@dataclass
class Page:
    """One request of a signed-in person."""

    request: Request
    session: Session
    principal: Principal

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {self.session.api_key}", **(extra or {})}

    async def api(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Call the public API as this person; the answer as the API gave it."""
        query = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        return await _client(self.request).request(
            method, path, params=query, json=body, headers=self._headers(headers)
        )

    async def api_json(self, method: str, path: str, **kw: Any) -> Any:
        """:meth:`api` for a call that must succeed: any other answer becomes the page's error."""
        response = await self.api(method, path, **kw)
        if response.status_code >= 400:
            self.fail(response)
        return response.json() if response.content else None

    def fail(self, response: httpx.Response) -> NoReturn:
        """Turn an API refusal into the page's: sign in again on 401, the API's status and detail otherwise."""
        if response.status_code == 401:
            raise SignInRequired(self.request.url.path)
        raise PageError(response.status_code, problem_detail(response))

    def relay(self, path: str) -> Response:
        """Stream a GET of the API to the browser (files and images), passing status, validators and cache
        headers; the browser's If-None-Match goes along, so an image it holds answers 304. Nothing is held in
        memory beyond one chunk."""
        passed = {name: self.request.headers[name] for name in RELAYED_REQUEST_HEADERS if name in self.request.headers}
        scope_headers = [(k.encode(), v.encode()) for k, v in self._headers(passed).items()]
        return Relay(path, scope_headers, sign_in_path=self.request.url.path)

    def render(self, template: str, context: Mapping[str, Any], *, status_code: int = 200) -> HTMLResponse:
        """A page of the signed-in layout."""
        response = TEMPLATES.TemplateResponse(
            self.request,
            template,
            {"csrf": self.session.csrf, "principal": self.principal, **context},
            status_code=status_code,
        )
        response.headers["Cache-Control"] = "no-store"  # a person's data and a form token: never cached
        return response


async def signed_in(request: Request) -> Page:
    """The dependency of every signed-in page: the session and the key's principal, or a redirect to sign in."""
    store = sessions(request)
    session = await store.load(request.cookies.get(COOKIE_NAME))
    next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if session is None:
        raise SignInRequired(next_path)
    try:
        principal = await request.app.state.resources.keys.verify(session.api_key)
    except InvalidKey as exc:
        await store.end(session.id)
        raise SignInRequired(next_path) from exc
    return Page(request, session, principal)


PageDep = Depends(signed_in)


def cross_site(request: Request) -> bool:
    """True for a request a browser says another site started (``Sec-Fetch-Site``, or an ``Origin`` that is not
    this host): refused on every form, whatever it carries."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("origin")
    return origin is not None and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", "")


def secure_cookies(request: Request) -> bool:
    """Whether the UI's cookies get the Secure flag: the setting when given; otherwise in production (TLS is
    normally terminated in front of Serve, which then sees plain HTTP) or when this request came over HTTPS."""
    settings = request.app.state.settings
    if settings.ui_cookie_secure is not None:
        return bool(settings.ui_cookie_secure)
    return settings.environment == "production" or request.url.scheme == "https"


async def checked_form(request: Request, page: Page) -> FormData:
    """The posted form when it carries the session's CSRF token (field ``csrf`` or header ``X-CSRF-Token``) and
    no browser says another site sent it; 403 otherwise."""
    if cross_site(request):
        raise PageError(403, "a form sent from another site is refused")
    form = await request.form()
    token = form.get("csrf") or request.headers.get("x-csrf-token")
    if not sessions(request).csrf_valid(page.session, token if isinstance(token, str) else None):
        raise PageError(403, "the form's security token is missing or stale: reload the page and try again")
    return form


def whole_number(text: object, *, digits: int = 18) -> int | None:
    """``text`` as a non-negative int when it is plain ASCII digits (at most ``digits``); None otherwise."""
    if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= digits:
        return int(text)
    return None


def see_other(path: str, params: Mapping[str, Any] | None = None) -> RedirectResponse:
    """A 303 to a UI path with its query (after a POST)."""
    query = urlencode({k: v for k, v in (params or {}).items() if v not in (None, "")})
    return RedirectResponse(f"{path}?{query}" if query else path, status_code=303)


def safe_next(value: str | None) -> str:
    """A post-sign-in target inside the UI (never another site)."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/review"


def field_errors(response: httpx.Response) -> dict[str, list[str]]:
    """A problem+json's per-field messages, by field (rule code first), for showing beside the form's fields."""
    try:
        body = response.json()
    except ValueError:
        return {"": [problem_detail(response)]}
    out: dict[str, list[str]] = {}
    for error in body.get("errors") or []:
        field = str(error.get("field") or error.get("loc", [""])[-1] or "")
        rule = error.get("rule") or error.get("code")
        text = str(error.get("detail") or error.get("msg") or "")
        out.setdefault(field, []).append(f"{rule}: {text}" if rule else text)
    if not out:
        out[""] = [problem_detail(response)]
    return out


def when(value: str | None) -> str:
    """An ISO timestamp as a short UTC text for tables."""
    if not value:
        return ""
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


TEMPLATES.env.filters["when"] = when


class Relay(Response):
    """GET a path of this app in-process and stream its answer to the browser as it comes: status, the headers in
    PASSED_HEADERS, then each body chunk (the browser's pace is the inner answer's pace; nothing is buffered).
    The browser's disconnect reaches the inner answer, which stops. A 401 (the key was revoked) becomes a
    redirect to sign in."""

    def __init__(self, path: str, headers: list[tuple[bytes, bytes]], *, sign_in_path: str) -> None:
        super().__init__()
        self.path = path
        self.inner_headers = headers
        self.sign_in_path = sign_in_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        raw_path, _, query = self.path.partition("?")
        inner: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": raw_path,
            "raw_path": raw_path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": self.inner_headers,
            "client": ("127.0.0.1", 0),
            "server": ("trailcam.internal", 80),
            "app": app,
        }
        requested = False
        refused = False

        async def inner_receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return await receive()  # the browser's disconnect

        async def inner_send(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start":
                if message["status"] == 401:
                    refused = True
                    target = f"/ui/login?{urlencode({'next': self.sign_in_path})}"
                    await RedirectResponse(target, status_code=303)(scope, receive, send)
                    return
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode().lower() in PASSED_HEADERS]
                await send({"type": "http.response.start", "status": message["status"], "headers": headers})
            elif message["type"] == "http.response.body" and not refused:
                await send(message)

        await app(inner, inner_receive, inner_send)
