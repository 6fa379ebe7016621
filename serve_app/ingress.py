"""The HTTP edge: builds the FastAPI app (routers, problem handlers) and its Serve deployment."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI
from ray import serve

from serve_app.api import exports, health, reid_routes
from serve_app.api import models as model_registry
from serve_app.api import reports as threshold_reports
from serve_app.api.deps import ExportQueue, ReIDService
from serve_app.api.guards import LimitBody, RequireKey
from serve_app.api.openapi import API_DESCRIPTION, API_TITLE, OPENAPI_TAGS
from serve_app.api.problems import COMMON_RESPONSES, install_problem_handlers
from serve_app.config import Settings
from serve_app.diagnostics import MemoryProbe
from serve_app.exports import metrics as export_metrics
from serve_app.exports.task import RAY_METRICS, RayExportQueue
from serve_app.reid.handle import ReIDHandle
from serve_app.resources import Resources
from serve_app.web import docs
from serve_app.web.security import SecurityHeaders
from serve_app.web.static import mount_static
from serve_app.web.ui.routes import install_ui

logger = logging.getLogger(__name__)


def serve_reid() -> ReIDService | None:
    """The ReID deployment of the Serve application this replica belongs to; None outside Serve (bare uvicorn),
    where identification answers 503 and readiness does not wait for a model."""
    try:
        context = serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not running in a Serve replica
        logger.info("not on Serve: no ReID deployment, no model readiness check")
        return None
    export_metrics.install(RAY_METRICS)  # a Serve replica records the export metrics it sees
    return ReIDHandle(context.app_name)


def model_check(reid: ReIDService) -> health.ReadinessCheck:
    """Readiness of the model: its service answers ``ready``."""

    async def check(resources: Resources) -> None:
        await reid.ready()

    return check


def create_app(
    settings_overrides: Mapping[str, Any] | None = None,
    *,
    reid: ReIDService | None = None,
    export_queue: ExportQueue | None = None,
) -> FastAPI:
    """The FastAPI application; also served by bare uvicorn for side-by-side benchmarks.

    ``reid`` and ``export_queue`` replace the Ray ones (the ReID deployment of this Serve application, one Ray
    task per export); the routes reach them through serve_app/api/deps.py.
    """
    settings = Settings(**dict(settings_overrides or {}))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resources = Resources.create(settings)
        await resources.open()
        app.state.resources = resources
        app.state.export_queue = export_queue if export_queue is not None else RayExportQueue(settings)
        app.state.reid = reid if reid is not None else serve_reid()
        if app.state.reid is not None:
            app.state.readiness_checks["model"] = model_check(app.state.reid)
        try:
            yield
        finally:
            await resources.close()

    app = FastAPI(
        title=API_TITLE,
        description=API_DESCRIPTION,
        openapi_tags=OPENAPI_TAGS,
        version="0.1.0",
        lifespan=lifespan,
        responses=COMMON_RESPONSES,
        docs_url=None,  # served from vendored assets by serve_app/web/docs.py (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.readiness_checks = dict(health.READINESS_CHECKS)
    install_problem_handlers(app)
    # Added last runs first: the security headers (on every answer outside /api, refusals included), the key
    # (headers only, so a caller without one sends no body into memory), then the body limit, then the routes
    # (which parse bodies).
    app.add_middleware(LimitBody, settings=settings)
    app.add_middleware(RequireKey)
    app.add_middleware(SecurityHeaders)
    app.include_router(health.router)
    app.include_router(threshold_reports.router)
    app.include_router(exports.router)
    app.include_router(reid_routes.router)
    app.include_router(model_registry.router)
    app.include_router(docs.router)
    install_ui(app)
    mount_static(app)
    return app


def app_builder(settings_overrides: Mapping[str, Any] | None = None) -> Callable[[], FastAPI]:
    """A zero-argument builder function (Serve needs a real function); evaluated on each replica."""
    overrides = dict(settings_overrides or {})

    def build() -> FastAPI:
        return create_app(overrides)

    return build


def ingress_deployment(settings_overrides: Mapping[str, Any] | None = None) -> serve.Deployment:
    """The ingress deployment class wrapping the app built on the replica."""

    @serve.deployment(name="Ingress", max_ongoing_requests=256)
    @serve.ingress(app_builder(settings_overrides))
    class Ingress:
        """Serves the FastAPI app; holds no state of its own."""

        def __init__(self, *bound: Any) -> None:
            # Bound deployments (ReID) belong to the application; the app reaches it by name (ReIDHandle).
            self.bound = bound
            self.memory = MemoryProbe()

        def memory_report(self, top: int = 15) -> dict[str, Any]:
            """What this replica holds and what grew since its first report (serve_app/diagnostics.py)."""
            return self.memory.report(top=top)

    # serve.deployment has already turned the class into a Deployment; mypy sees the class.
    return cast(serve.Deployment, Ingress)
