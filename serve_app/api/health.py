"""Liveness and readiness: /healthz answers while the process runs, /readyz checks its services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve_app.api.deps import ResourcesDep
from serve_app.api.problems import problem_response, retry_later
from serve_app.resources import Resources
from serve_app.store.db import ping

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0

ReadinessCheck = Callable[[Resources], Awaitable[None]]


async def _check_redis(resources: Resources) -> None:
    await resources.redis.ping()


async def _check_postgres(resources: Resources) -> None:
    await ping(resources.pool, timeout_s=CHECK_TIMEOUT_S)


READINESS_CHECKS: dict[str, ReadinessCheck] = {"redis": _check_redis, "postgres": _check_postgres}


async def _run_check(name: str, check: ReadinessCheck, resources: Resources) -> tuple[str, str | None]:
    try:
        await asyncio.wait_for(check(resources), timeout=CHECK_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the reason is reported
        return name, f"{type(exc).__name__}: {exc}".strip()[:200]
    return name, None


@router.get("/healthz", summary="Liveness: the ingress process answers")
async def healthz() -> dict[str, str]:
    """Always 200 while the replica runs."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: Redis, Postgres and the model answer",
    responses={503: {"description": "a dependency is down", "content": {"application/problem+json": {}}}},
)
async def readyz(request: Request, resources: ResourcesDep) -> Any:
    """200 when every dependency answers; 503 problem+json naming the ones that do not."""
    checks_to_run: dict[str, ReadinessCheck] = getattr(request.app.state, "readiness_checks", READINESS_CHECKS)
    results = await asyncio.gather(*(_run_check(n, c, resources) for n, c in checks_to_run.items()))
    down = {name: reason for name, reason in results if reason}
    checks = {name: ("down" if reason else "ok") for name, reason in results}
    if down:
        logger.warning("not ready: %s", down)
        return problem_response(
            503,
            "not-ready",
            "not ready: " + ", ".join(f"{n} is down ({r})" for n, r in down.items()),
            headers=retry_later(),
            instance="/readyz",
            extra={"services": sorted(down), "checks": checks},
        )
    return JSONResponse({"status": "ready", "checks": checks})
