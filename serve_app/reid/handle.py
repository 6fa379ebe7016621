"""The ingress's side of the ReID deployment: its name and a handle wrapper (serve_app.api.deps.ReIDService).

Kept apart from serve_app/reid/deployment.py so that an ingress replica imports only Serve's handle API, not
the model stack (the Identifier, the embedder, torchvision) that only the ReID replicas need.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serve_app.errors import ImageConflict, ModelUnreachable, TrailcamError
from serve_app.reid.identification import Identification, IdentifyRequest

DEPLOYMENT_NAME = "ReID"


class ReIDHandle:
    """The ReID deployment of a Serve application as the ingress's routes call it (serve_app.api.deps.ReIDService).

    The handle is looked up by name on first use; Ray's wrapping of a replica's exception is undone here, so
    routes see the domain error the replica raised.
    """

    def __init__(self, app_name: str) -> None:
        self._app_name = app_name
        self._handle: Any = None

    def _deployment(self) -> Any:
        if self._handle is None:
            try:
                self._handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=self._app_name)
            except Exception as exc:
                raise ModelUnreachable(f"the ReID deployment is not reachable: {exc}") from exc
        return self._handle

    async def identify(self, item: IdentifyRequest) -> Identification | ImageConflict:
        """One crop, batched with other callers' crops by the replica."""
        handle = self._deployment()
        try:
            result: Identification | ImageConflict = await handle.identify.remote(item)
        except TrailcamError as exc:
            # Ray re-raises a replica's exception as a subclass of its type; the original is its ``cause``.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from exc
            raise
        return result

    async def ready(self) -> Any:
        """The loaded model's version (fails while no replica has loaded it)."""
        return await self._deployment().ready.remote()
