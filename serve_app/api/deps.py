"""FastAPI dependencies: the process resources and the caller's API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve_app.errors import InvalidKey
from serve_app.keys import Principal
from serve_app.resources import Resources


async def get_resources(request: Request) -> Resources:
    """The resources opened in the app's lifespan (async: a plain function would cost a thread hop per request)."""
    resources: Resources = request.app.state.resources
    return resources


async def require_principal(request: Request, resources: Annotated[Resources, Depends(get_resources)]) -> Principal:
    """The caller's key from ``Authorization: Bearer``; 401 when missing, unknown or revoked.

    /api requests were verified by the RequireKey middleware before their body was read; this only
    verifies a request that did not pass through it.
    """
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is not None:
        return principal
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidKey("missing API key: send 'Authorization: Bearer <key>'")
    return await resources.keys.verify(token.strip())


ResourcesDep = Annotated[Resources, Depends(get_resources)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
