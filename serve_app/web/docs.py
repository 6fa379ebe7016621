"""The API docs at /docs (Swagger UI) and /redoc (ReDoc) from vendored assets: they work without internet and
under the pages' Content-Security-Policy (no inline script, nothing from another origin)."""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from serve_app.web.static import STATIC_PREFIX

router = APIRouter(include_in_schema=False)

SWAGGER_UI = "vendor/swagger-ui"
REDOC = "vendor/redoc"
FAVICON = f"{SWAGGER_UI}/favicon-32x32.png"

_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" type="image/png" href="{favicon}">
{stylesheets}
</head>
<body>
<noscript>The API docs need JavaScript; the schema itself is at <a href="{openapi_url}">{openapi_url}</a>.</noscript>
<div id="{root_id}" data-openapi-url="{openapi_url}"></div>
{scripts}
</body>
</html>
"""


def _page(request: Request, *, title: str, root_id: str, stylesheets: list[str], scripts: list[str]) -> HTMLResponse:
    """A docs page whose assets and schema URL sit under the app's root path (Serve's route prefix)."""
    root = request.scope.get("root_path", "").rstrip("/")

    def static(path: str) -> str:
        return escape(f"{root}{STATIC_PREFIX}/{path}")

    html = _PAGE.format(
        title=escape(f"{request.app.title} - {title}"),
        favicon=static(FAVICON),
        stylesheets="\n".join(f'<link rel="stylesheet" href="{static(path)}">' for path in stylesheets),
        root_id=root_id,
        openapi_url=escape(root + request.app.openapi_url),
        scripts="\n".join(f'<script src="{static(path)}"></script>' for path in scripts),
    )
    return HTMLResponse(html)


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI on the app's OpenAPI schema."""
    return _page(
        request,
        title="Swagger UI",
        root_id="swagger-ui",
        stylesheets=[f"{SWAGGER_UI}/swagger-ui.css", "docs/docs.css"],
        scripts=[f"{SWAGGER_UI}/swagger-ui-bundle.js", "docs/swagger-init.js"],
    )


@router.get("/redoc", response_class=HTMLResponse)
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc on the app's OpenAPI schema."""
    return _page(
        request,
        title="ReDoc",
        root_id="redoc",
        stylesheets=["docs/docs.css"],
        scripts=[f"{REDOC}/redoc.standalone.js", "docs/redoc-init.js"],
    )
