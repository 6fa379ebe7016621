"""The typed Serve application builder (``import_path: serve_app.app:build_app``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from serve_app.ingress import ingress_deployment
from serve_app.reid.deployment import ReIDArgs, reid_deployment


class IngressArgs(BaseModel):
    """Ingress tuning."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=256, ge=1)
    num_cpus: float = Field(default=1.0, ge=0, description="Logical CPUs reserved per ingress replica.")


class AppArgs(BaseModel):
    """Builder arguments from serve_config.yaml ``args``; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict, description="Overrides for Settings (tests, config files); env TRAILCAM_* otherwise."
    )
    ingress: IngressArgs = Field(default_factory=IngressArgs)
    reid: ReIDArgs = Field(default_factory=ReIDArgs, description="The ReID deployment (model, batching, scaling).")


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """Build the application graph from typed args."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    ingress = ingress_deployment(parsed.settings).options(
        num_replicas=parsed.ingress.num_replicas,
        max_ongoing_requests=parsed.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": parsed.ingress.num_cpus},
        max_surge_percent=100,  # a redeploy starts new replicas before it stops old ones
    )
    # Binding ReID into the ingress makes it part of this application; routers reach it by name.
    return ingress.bind(reid_deployment(parsed.reid, parsed.settings))
