"""The re-ID routers (identification, review, deer) and the model readiness check, mounted as one router."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from ray import serve

from serve_app.api import deer, detections, review
from serve_app.resources import Resources

logger = logging.getLogger(__name__)


async def check_model(resources: Resources) -> None:
    """Ready when a ReID replica answers with a loaded model."""
    handle = serve.get_deployment_handle(detections.REID_DEPLOYMENT, app_name=serve.get_replica_context().app_name)
    await handle.ready.remote()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Inside Serve, readiness also requires the model; a bare uvicorn app has no ReID deployment to wait for."""
    checks: dict[str, Any] = getattr(app.state, "readiness_checks", {})
    try:
        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not running in a Serve replica
        logger.info("not on Serve: no model readiness check")
    else:
        checks["model"] = check_model
    yield


router = APIRouter(lifespan=_lifespan)
router.include_router(detections.router)
router.include_router(review.router)
router.include_router(deer.router)
