"""The HTTP edge: builds the FastAPI app (routers, problem handlers) and its Serve deployment."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI
from ray import serve

from serve_app.api import exports, health, reid_routes
from serve_app.api import reports as threshold_reports
from serve_app.api.guards import LimitBody, RequireKey
from serve_app.api.openapi import API_DESCRIPTION, API_TITLE, OPENAPI_TAGS
from serve_app.api.problems import COMMON_RESPONSES, install_problem_handlers
from serve_app.config import Settings
from serve_app.resources import Resources

logger = logging.getLogger(__name__)


def create_app(settings_overrides: Mapping[str, Any] | None = None) -> FastAPI:
    """The FastAPI application; also served by bare uvicorn for side-by-side benchmarks."""
    settings = Settings(**dict(settings_overrides or {}))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resources = Resources.create(settings)
        await resources.open()
        app.state.resources = resources
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
    )
    app.state.settings = settings
    app.state.readiness_checks = dict(health.READINESS_CHECKS)
    install_problem_handlers(app)
    # Added last runs first: the key (headers only, so a caller without one sends no body into memory),
    # then the body limit, then the routes (which parse bodies).
    app.add_middleware(LimitBody, settings=settings)
    app.add_middleware(RequireKey)
    app.include_router(health.router)
    app.include_router(threshold_reports.router)
    app.include_router(exports.router)
    app.include_router(reid_routes.router)
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
            # Bound deployments (ReID) belong to the application; routers look them up by name.
            self.bound = bound

    # serve.deployment has already turned the class into a Deployment; mypy sees the class.
    return cast(serve.Deployment, Ingress)
