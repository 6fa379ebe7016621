"""The web UI's router: sign-in and sign-out, crops for <img>, and the pages of each part (review, deer,
exports, reports) included from their modules."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from serve_app.errors import InvalidKey, ServiceUnavailable
from serve_app.web.ui import deer, exports, reports, review
from serve_app.web.ui.pages import (
    TEMPLATES,
    Page,
    PageDep,
    PageError,
    SignInRequired,
    checked_form,
    cross_site,
    lifespan,
    safe_next,
    secure_cookies,
    see_other,
    sessions,
)
from serve_app.web.ui.session import COOKIE_NAME, LOGIN_COOKIE_NAME, LOGIN_TOKEN_TTL_S, new_browser_nonce

# The app runs the router's lifespan inside its own (resources open first): FastAPI merges it on include.
router = APIRouter(prefix="/ui", include_in_schema=False, lifespan=lifespan)


def _sign_in_form(
    request: Request, *, next_path: str, error: str | None = None, status_code: int = 200
) -> HTMLResponse:
    """The form, its token bound to a fresh sign-in cookie (a form posted from another site has no cookie)."""
    held = request.cookies.get(LOGIN_COOKIE_NAME, "")
    # The browser's nonce is kept while it is one of ours in shape, so two open sign-in forms both work.
    nonce = (
        held
        if 16 <= len(held) <= 64 and held.isascii() and held.replace("-", "").replace("_", "").isalnum()
        else (new_browser_nonce())
    )
    response = TEMPLATES.TemplateResponse(
        request,
        "login.html",
        {"login_token": sessions(request).login_token(nonce), "next": next_path, "error": error},
        status_code=status_code,
    )
    response.set_cookie(
        LOGIN_COOKIE_NAME, nonce, max_age=LOGIN_TOKEN_TTL_S, path="/ui/login", httponly=True, samesite="strict",
        secure=secure_cookies(request),
    )  # fmt: skip
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("", include_in_schema=False)
async def ui_home() -> RedirectResponse:
    """The UI starts at the review queue."""
    return RedirectResponse("/ui/review", status_code=303)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    """The sign-in form."""
    return _sign_in_form(request, next_path=safe_next(next))


@router.post("/login")
async def login(
    request: Request,
    api_key: Annotated[str, Form(max_length=500)] = "",
    login_token: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Verify the key exactly as the API does; on success the session cookie, then the page asked for."""
    store = sessions(request)
    target = safe_next(next)
    if cross_site(request) or not store.login_token_valid(login_token, request.cookies.get(LOGIN_COOKIE_NAME)):
        return _sign_in_form(
            request, next_path=target, error="The form expired: please sign in again.", status_code=403
        )
    try:
        await request.app.state.resources.keys.verify(api_key.strip())
    except InvalidKey:
        return _sign_in_form(request, next_path=target, error="That API key is not valid.", status_code=401)
    except ServiceUnavailable as exc:
        return _sign_in_form(request, next_path=target, error=f"Sign-in is unavailable: {exc}", status_code=503)
    session = await store.create(api_key.strip())
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        store.cookie_value(session.id),
        max_age=store.ttl_s,
        path="/",
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request),
    )
    response.delete_cookie(LOGIN_COOKIE_NAME, path="/ui/login", httponly=True, samesite="strict")
    return response


@router.post("/logout")
async def logout(request: Request, page: Page = PageDep) -> Response:
    """End the session (its Redis record goes) and clear the cookie."""
    await checked_form(request, page)
    await sessions(request).end(page.session.id)
    response = see_other("/ui/login")
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


@router.get("/crops/{detection_id}", summary="A detection's crop for the pages")
async def crop(detection_id: int, page: Page = PageDep) -> Response:
    """The API's crop of the detection, relayed with its ETag (304 when the browser has it)."""
    return page.relay(f"/api/detections/{detection_id}/crop")


router.include_router(review.router)
router.include_router(deer.router)
router.include_router(exports.router)
router.include_router(reports.router)


def install_ui(app: FastAPI) -> None:
    """Add the pages and their error handling to the app."""

    async def to_sign_in(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequired)
        if request.headers.get("hx-request"):
            # A poll or a fragment after the session ended: htmx sends the whole page to sign-in.
            return Response(status_code=401, headers={"HX-Redirect": "/ui/login"})
        target = exc.next_path if request.method == "GET" else "/ui/review"
        return RedirectResponse(f"/ui/login?{urlencode({'next': target})}", status_code=303)

    async def page_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageError)
        return TEMPLATES.TemplateResponse(
            request, "error.html", {"status": exc.status, "detail": exc.detail}, status_code=exc.status
        )

    app.add_exception_handler(SignInRequired, to_sign_in)
    app.add_exception_handler(PageError, page_error)
    app.include_router(router)
