"""Security headers on every page the app serves to browsers (everything outside /api/): a strict
Content-Security-Policy and its companions, so a page runs only this app's own scripts."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.guards import API_PREFIX, route_path

# Beyond 'self', only what the vendored docs UIs need:
# - style-src 'unsafe-inline': Swagger UI (React style attributes) and ReDoc (styled-components <style> elements)
#   style the page at run time; scripts stay 'self' only.
# - img-src data: blob:: Swagger UI's and ReDoc's icons are data: URIs; Swagger UI shows an image answer of
#   "Try it out" (a crop) from a blob: URL.
# - worker-src blob:: ReDoc builds its search index in a Web Worker loaded from a blob: URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response outside /api/ (JSON for programs, not pages); a header the
    route already set (a page with a stricter policy) is kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope).startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])  # optional in ASGI
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
