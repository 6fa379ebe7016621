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


async def require_principal(request: Request) -> Principal:
    """The caller's key, verified by the RequireKey middleware (serve_app/api/guards.py) before the body was
    read; 401 for a route outside the prefix that middleware guards."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        raise InvalidKey("missing API key: send 'Authorization: Bearer <key>'")
    return principal


ResourcesDep = Annotated[Resources, Depends(get_resources)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
