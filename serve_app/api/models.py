"""GET /api/models and /api/models/{version}: the model registry (serve_app/store/models.py).

Models are not site-scoped: any valid key reads them. ``python -m batch.models`` registers, promotes and rolls
back; these routes only read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path

from serve_app.api.deps import PrincipalDep, ReIDDep, ResourcesDep
from serve_app.errors import NotFound
from serve_app.store.db import Row
from serve_app.store.models import get_model, list_models

logger = logging.getLogger(__name__)

router = APIRouter(tags=["models"])

SERVING_TIMEOUT_S = 2.0
"""How long the list waits for a ReID replica to say which version it runs, seconds."""


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def version_json(row: Row) -> dict[str, Any]:
    """A registry row as the API answers it."""
    return {
        "version": row["version"],
        "status": row["status"],
        "architecture": row["architecture"],
        "input_size_px": row["input_size_px"],
        "embedding_dim": row["embedding_dim"],
        "weights_sha256": row["weights_sha256"],
        "parent_version": row["parent_version"],
        "run": row["run"],
        "training": {"epochs": row["epochs"], "data": row["training_data"]},
        "validation": row["validation"],
        "recommended_thresholds": {"accept": row["recommended_accept"], "review": row["recommended_review"]},
        "created_at": _iso(row["created_at"]),
        "registered_at": _iso(row["registered_at"]),
        "promoted_at": _iso(row["promoted_at"]),
    }


async def serving_version(reid: ReIDDep) -> str | None:
    """The version a ReID replica of this app reports now; None when none answers in time."""
    try:
        return str(await asyncio.wait_for(reid.ready(), timeout=SERVING_TIMEOUT_S))
    except Exception as exc:  # noqa: BLE001 - no model answering is an answer here, not an error
        logger.info("no model version to report: %s", type(exc).__name__)
        return None


@router.get("/api/models", summary="Registered model versions and the one serving now")
async def models_list(resources: ResourcesDep, principal: PrincipalDep, reid: ReIDDep) -> dict[str, Any]:
    """Every version (the active one first, then the newest) and ``serving_version``, what a replica runs."""
    rows, serving = await asyncio.gather(list_models(resources.pool), serving_version(reid))
    return {"items": [version_json(r) for r in rows], "serving_version": serving}


@router.get("/api/models/{version}", summary="One model version: its figures, model card and promotions")
async def models_get(
    version: Annotated[str, Path(max_length=200)], resources: ResourcesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """The version, its card as registered and every promote or rollback naming it; 404 when unknown."""
    row, events = await get_model(resources.pool, version)
    if row is None:
        raise NotFound(f"no model version {version!r} is registered")
    history = [{**e, "at": _iso(e["at"])} for e in events]
    return {**version_json(row), "card": public_card(row["card"]), "history": history}


def public_card(card: dict[str, Any]) -> dict[str, Any]:
    """The model card without the server's file paths (the weights file, the training set's folder)."""
    out = {k: v for k, v in card.items() if k != "weights_path"}
    training = dict(out.get("training") or {})
    if isinstance(training.get("config"), dict):
        training["config"] = {k: v for k, v in training["config"].items() if k != "data"}
    if training:
        out["training"] = training
    return out
