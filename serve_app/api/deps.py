"""FastAPI dependencies: the process resources, the caller's API key, the model and the export queue.

The model and the queue are protocols: the ingress (serve_app/ingress.py) puts the Ray implementations on
``app.state``; a test or another host can put plain-Python ones there. Routers never import Ray.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from serve_app.errors import ImageConflict, InvalidKey, ModelUnreachable
from serve_app.keys import Principal
from serve_app.reid.identification import Identification, IdentifyRequest
from serve_app.resources import Resources


class ReIDService(Protocol):
    """What the identification routes call (the ReID deployment behind the ingress, or a stand-in)."""

    async def identify(self, item: IdentifyRequest) -> Identification | ImageConflict:
        """Identify one crop (callers' crops may be batched together); a refused image answers its conflict.

        Raises ModelUnreachable when no model can be reached; any other exception is a failure to identify."""
        ...

    async def ready(self) -> Any:
        """Return once the model is loaded (the readiness check); raise otherwise."""
        ...


class ExportQueue(Protocol):
    """Where accepted exports run (a Ray task per job, or a stand-in); job status lives in Redis either way."""

    async def submit(self, job_id: str, *, params: dict[str, Any]) -> None:
        """Start the runner for a job created as processing; raise ServiceUnavailable when it cannot start."""
        ...

    async def cancel(self, job_id: str) -> None:
        """Best effort: stop a runner this process started (a runner also notices a deleted job by itself)."""
        ...


class NoModel:
    """The ReID service of an app without a ReID deployment (bare uvicorn): every identification is refused."""

    async def identify(self, item: IdentifyRequest) -> Identification | ImageConflict:
        raise ModelUnreachable("the ReID deployment is not reachable: this application has none")

    async def ready(self) -> Any:
        raise ModelUnreachable("the ReID deployment is not reachable: this application has none")


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


async def get_reid(request: Request) -> ReIDService:
    """The ReID service the ingress installed (``NoModel`` when the app has none)."""
    reid: ReIDService | None = getattr(request.app.state, "reid", None)
    return reid if reid is not None else NoModel()


async def get_export_queue(request: Request) -> ExportQueue:
    """The export queue the ingress installed."""
    queue: ExportQueue = request.app.state.export_queue
    return queue


ResourcesDep = Annotated[Resources, Depends(get_resources)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
ReIDDep = Annotated[ReIDService, Depends(get_reid)]
ExportQueueDep = Annotated[ExportQueue, Depends(get_export_queue)]
