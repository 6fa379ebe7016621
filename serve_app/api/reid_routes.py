"""The re-ID routers (identification, crops, review, deer, threshold history), mounted as one router.

The model they call and its readiness check come from the ingress (serve_app/ingress.py), through
serve_app/api/deps.py.
"""

from __future__ import annotations

from fastapi import APIRouter

from serve_app.api import crops, deer, detections, review, thresholds

router = APIRouter()
router.include_router(detections.router)
router.include_router(crops.router)
router.include_router(review.router)
router.include_router(deer.router)
router.include_router(thresholds.router)
