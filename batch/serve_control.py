"""Change the running Serve app's re-ID settings: read its deployed config, edit ``args.reid``, deploy it back.

Two ways in, the same methods:

- ``DashboardControl(address)``: Serve's REST API on the Ray dashboard (``http://127.0.0.1:8265`` for
  ``make run``; ``RAY_DASHBOARD_ADDRESS`` when set), what ``serve deploy`` and ``serve config`` use.
- ``ClientControl()``: from a Ray driver already connected to the cluster (no dashboard needed).

A change of the model (``architecture``/``weights``/``input_size_px``) is a change of the application's
args: Serve replaces its replicas, starting each new replica before it stops an old one
(``max_surge_percent: 100`` on both deployments), so identifications keep being answered. Thresholds go
into the ReID deployment's ``user_config`` override (``deployments: [{name: ReID, user_config: ...}]``),
which reaches the running replicas through ``reconfigure`` and restarts nothing (a change of ``args``
would: Serve versions an application by its args). Every other application and setting is deployed back
as it was.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any, Protocol

import httpx

logger = logging.getLogger(__name__)

APP_NAME = "trailcam"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
REID_DEPLOYMENT = "ReID"


class ServeControlError(RuntimeError):
    """The running app could not be read, changed, or did not come back healthy."""


class ServeControl(Protocol):
    """What the commands that change the running app need from Serve."""

    def details(self) -> dict[str, Any]:
        """Serve's details: ``applications`` by name (status, ``deployed_app_config``, deployments), http options."""
        ...

    def deploy(self, config: dict[str, Any]) -> None:
        """Deploy a whole Serve config (every application: Serve removes the ones it does not list)."""
        ...


class DashboardControl:
    """Serve's REST API on the Ray dashboard."""

    def __init__(self, address: str | None = None, *, timeout_s: float = 30.0) -> None:
        self.address = (address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD).rstrip("/")
        if "://" not in self.address:
            self.address = "http://" + self.address
        self.timeout_s = timeout_s

    def _request(self, method: str, body: dict[str, Any] | None = None) -> httpx.Response:
        url = f"{self.address}/api/serve/applications/"
        try:
            response = httpx.request(method, url, json=body, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise ServeControlError(f"the Ray dashboard at {self.address} did not answer: {exc}") from exc
        if response.status_code >= 400:
            raise ServeControlError(f"{method} {url}: HTTP {response.status_code}: {response.text[:500]}")
        return response

    def details(self) -> dict[str, Any]:
        return dict(self._request("GET").json())

    def deploy(self, config: dict[str, Any]) -> None:
        self._request("PUT", config)


class ClientControl:
    """Serve's controller, from a Ray driver connected to the cluster (``ray.init(address=...)`` done)."""

    @staticmethod
    def _client() -> Any:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            raise ServeControlError("Serve is not running on the connected Ray cluster")
        return client

    def details(self) -> dict[str, Any]:
        # The controller's answer holds enums (status ApplicationStatus.RUNNING, which str() does not write as
        # "RUNNING"); the dashboard sends it through json.dumps, which writes their values. The same here, so
        # both controls answer the same shape and wait_running sees "RUNNING".
        return dict(json.loads(json.dumps(self._client().get_serve_details())))

    def deploy(self, config: dict[str, Any]) -> None:
        from ray.serve.schema import ServeDeploySchema

        self._client().deploy_apps(ServeDeploySchema.model_validate(config))


def _app(details: dict[str, Any], app: str) -> dict[str, Any]:
    found = (details.get("applications") or {}).get(app)
    if not found or not found.get("deployed_app_config"):
        raise ServeControlError(
            f"no Serve application {app!r} deployed from a config is running"
            f" (running: {sorted((details.get('applications') or {}).keys())})"
        )
    return dict(found)


def deployed_config(details: dict[str, Any]) -> dict[str, Any]:
    """The whole Serve config that produced what runs now (every application, proxy and HTTP options)."""
    config: dict[str, Any] = {
        "applications": [
            copy.deepcopy(a["deployed_app_config"])
            for a in (details.get("applications") or {}).values()
            if a.get("deployed_app_config")
        ]
    }
    if details.get("proxy_location"):
        config["proxy_location"] = details["proxy_location"]
    http = details.get("http_options") or {}
    kept = ("host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s")
    if http:
        config["http_options"] = {k: http[k] for k in kept if http.get(k) is not None}
    return config


def reid_args(details: dict[str, Any], app: str = APP_NAME) -> dict[str, Any]:
    """The running app's ``args.reid`` as deployed (a copy)."""
    return copy.deepcopy((_app(details, app)["deployed_app_config"].get("args") or {}).get("reid") or {})


def user_config(details: dict[str, Any], app: str = APP_NAME) -> dict[str, Any]:
    """The ReID deployment's ``user_config`` in force: a ``deployments`` override wins over ``args.reid``."""
    deployed = _app(details, app)["deployed_app_config"]
    for deployment in deployed.get("deployments") or []:
        if deployment.get("name") == REID_DEPLOYMENT and deployment.get("user_config") is not None:
            return dict(deployment["user_config"])
    return dict(reid_args(details, app).get("user_config") or {})


def _with_reid(
    config: dict[str, Any], app: str, changes: dict[str, Any], new_user_config: dict[str, Any] | None
) -> None:
    target = next(a for a in config["applications"] if a["name"] == app)
    if changes:
        target.setdefault("args", {}).setdefault("reid", {}).update(changes)
    if new_user_config is not None:
        deployments = target.setdefault("deployments", [])
        entry = next((d for d in deployments if d.get("name") == REID_DEPLOYMENT), None)
        if entry is None:
            entry = {"name": REID_DEPLOYMENT}
            deployments.append(entry)
        entry["user_config"] = new_user_config


def update_reid(
    control: ServeControl,
    *,
    changes: dict[str, Any] | None = None,
    new_user_config: dict[str, Any] | None = None,
    app: str = APP_NAME,
    timeout_s: float = 600.0,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Deploy the running config with ``args.reid`` updated by ``changes`` and/or a new ``user_config``.

    Returns, once the app is RUNNING again under the new config, the whole Serve config that ran before (what
    ``restore`` deploys back when a later step fails). When the app does not get there within ``timeout_s``,
    that config is deployed back and ServeControlError raised; so it is when the deploy or the wait is
    interrupted (Ctrl-C) or fails any other way, and that error is raised.
    """
    details = control.details()
    previous = deployed_config(details)
    config = copy.deepcopy(previous)
    _with_reid(config, app, changes or {}, new_user_config)
    deployed_at = float(_app(details, app).get("last_deployed_time_s") or 0.0)
    try:
        control.deploy(config)
        wait_running(control, app=app, newer_than=deployed_at, timeout_s=timeout_s, poll_s=poll_s)
    except BaseException as exc:
        if not isinstance(exc, ServeControlError):
            logger.warning("%s: deploying the previous Serve config back (up to %.0f s)", type(exc).__name__, timeout_s)
        restore(control, previous, app=app, timeout_s=timeout_s)
        raise
    return previous


def restore(
    control: ServeControl, previous_config: dict[str, Any], *, app: str = APP_NAME, timeout_s: float = 600.0
) -> None:
    """Deploy a whole Serve config that ran before (what ``update_reid`` returned) back, exactly as it was. A
    failure is logged, not raised: the caller raises the error that made it restore."""
    try:
        deployed_at = float(_app(control.details(), app).get("last_deployed_time_s") or 0.0)
        control.deploy(previous_config)
        wait_running(control, app=app, newer_than=deployed_at, timeout_s=timeout_s)
    except Exception:  # the caller raises the error that made it restore
        logger.exception("could not deploy the previous Serve config back")


def wait_running(
    control: ServeControl,
    *,
    app: str = APP_NAME,
    newer_than: float = 0.0,
    timeout_s: float = 600.0,
    poll_s: float = 1.0,
) -> None:
    """Wait until ``app`` was deployed after ``newer_than`` (epoch seconds) and is RUNNING."""
    deadline = time.monotonic() + timeout_s
    last = "not seen"
    while time.monotonic() < deadline:
        found = (control.details().get("applications") or {}).get(app) or {}
        status = str(found.get("status", "missing"))
        last = f"{status}: {found.get('message') or ''}".strip()
        if float(found.get("last_deployed_time_s") or 0.0) > newer_than and status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise ServeControlError(f"Serve could not deploy {app!r}: {last}")
        time.sleep(poll_s)
    raise ServeControlError(f"{app!r} was not RUNNING under the new config after {timeout_s:.0f} s (last: {last})")
