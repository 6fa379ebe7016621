"""The model registry: register model cards, list versions, promote one to the running Serve app, roll back.

    python -m batch.models register .data/models/<version>.card.json [--status active]
    python -m batch.models list
    python -m batch.models promote <version> [--actor NAME] [--dashboard URL]
    python -m batch.models rollback [--actor NAME] [--dashboard URL]

``register`` stores a card (``python -m batch.train`` writes them) in ``model_versions``: again for the same
version only updates its card. ``--status active`` says the version already runs (``make run`` registers
the model it deployed). ``promote`` deploys a version through Serve (batch/serve_control.py: the ReID
replicas are replaced one by one, with the card's recommended thresholds), then marks it active, the
previous one retired, and records who and when in ``model_promotions``; it then asks the running app which
version its replicas report. ``rollback`` promotes the version that was active before the current one
(again: the one before that). A missing or changed weights file, random weights, an unknown or already
active version are refused (exit code 2) before Serve is touched.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import psycopg

from batch.serve_control import (
    APP_NAME,
    REID_DEPLOYMENT,
    DashboardControl,
    ServeControl,
    ServeControlError,
    reid_args,
    restore,
    update_reid,
    user_config,
)
from serve_app.config import get_settings
from serve_app.errors import ModelRefused
from serve_app.reid.model_spec import ModelSpec, file_sha256, model_version_for, version_has_random_weights
from serve_app.store import models as store
from serve_app.store.db import Row, SyncConn, connect
from serve_app.store.models import Action, VersionRecord

logger = logging.getLogger(__name__)

DEFAULT_API = "http://127.0.0.1:8000"
DEFAULT_KEY_FILE = Path(".data/dev-api-key")
CHECK_SAMPLES = 6
"""How many times the check after a promote asks the running app which version it serves."""


def _required(card: dict[str, Any], key: str, source: Path) -> Any:
    if card.get(key) in (None, ""):
        raise ModelRefused(f"{source} is not a model card: it has no {key!r}")
    return card[key]


def check_weights(version: str, weights_path: str, sha256: str) -> None:
    """ModelRefused unless the weights file is there with the recorded SHA-256."""
    path = Path(weights_path)
    if not path.is_file():
        raise ModelRefused(f"the weights file of {version} is missing: {weights_path}")
    actual = file_sha256(path)
    if actual != sha256:
        raise ModelRefused(
            f"the weights file of {version} changed: {weights_path} has SHA-256 {actual}, the card says {sha256}"
        )


def read_card(path: Path) -> VersionRecord:
    """A model card as a registry record; ModelRefused for a card that is not one, names other weights than
    its file's, or whose weights file is missing or changed."""
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelRefused(f"cannot read the model card {path}: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelRefused(f"{path} is not a model card: not a JSON object")
    version = str(_required(card, "version", path))
    if version_has_random_weights(version):
        raise ModelRefused(f"{version} has random weights (tests only): it cannot be registered")
    try:
        record = _record(card, path)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelRefused(f"{path} is not a valid model card: {exc}") from exc
    check_weights(version, record.weights_path, record.weights_sha256)
    spec = ModelSpec(record.architecture, record.weights_path, input_size_px=record.input_size_px)
    named = model_version_for(spec, digest=record.weights_sha256[:12])
    if named != version:
        raise ModelRefused(f"{path} names version {version}, but its weights make it {named}")
    return record


def _threshold(value: Any) -> float | None:
    if value is None:
        return None
    if not -1.0 <= float(value) <= 1.0:
        raise ValueError(f"threshold {value} is outside [-1, 1]")
    return float(value)


def _record(card: dict[str, Any], path: Path) -> VersionRecord:
    weights = Path(str(_required(card, "weights_path", path)))
    weights = weights if weights.is_absolute() else (path.parent / weights).resolve()
    validation = dict(card.get("validation") or {})
    recommended = dict(card.get("recommended_thresholds") or {})
    accept, review = _threshold(recommended.get("accept")), _threshold(recommended.get("review"))
    if accept is not None and review is not None and review > accept:
        raise ValueError(f"its review threshold {review} is above its accept threshold {accept}")
    created = str(card.get("created_at") or "")
    training = dict(card.get("training") or {})
    return VersionRecord(
        version=str(card["version"]),
        architecture=str(_required(card, "architecture", path)),
        input_size_px=int(_required(card, "input_size_px", path)),
        weights_path=str(weights),
        weights_sha256=str(_required(card, "weights_sha256", path)).lower(),
        created_at=dt.datetime.fromisoformat(created) if created else dt.datetime.now(dt.UTC),
        card=card,
        embedding_dim=card.get("embedding_dim"),
        parent_version=card.get("parent_version"),
        run=card.get("run"),
        training_data=dict(training.get("data") or {}),
        epochs=training.get("epochs"),
        validation={k: v for k, v in validation.items() if k != "curve"},
        top1_known=validation.get("top1_known"),
        recommended_accept=accept,
        recommended_review=review,
    )


def register(conn: SyncConn, path: Path, *, active: bool = False, actor: str) -> tuple[VersionRecord, bool]:
    """Register a card (see read_card); with ``active``, record that it is the version running now. Returns the
    record and whether it was new."""
    record = read_card(path)
    try:
        with conn.transaction():
            new = store.register(conn, record=record)
    except (psycopg.IntegrityError, psycopg.DataError) as exc:
        raise ModelRefused(f"{path} has a value the registry cannot hold: {exc}") from exc
    if active and (current := store.active_version(conn)) is not None and current["version"] == record.version:
        return record, new
    if active:
        store.record_activation(
            conn,
            version=record.version,
            action="promote",
            actor=actor,
            accept_threshold=record.recommended_accept,
            review_threshold=record.recommended_review,
        )
    return record, new


def thresholds_for(row: Row, running: dict[str, Any], events: Sequence[Row]) -> tuple[float, float | None, str]:
    """The accept and review thresholds to deploy ``row`` with, and where they come from."""
    accept = row["recommended_accept"]
    if accept is not None:
        review = row["recommended_review"]
        run_accept, run_review = running.get("accept_threshold"), running.get("review_threshold")
        if review is None and run_accept is not None and run_review is not None:
            # The review band keeps the width it has now (as cluster/local/serve_config.py does).
            review = round(max(-1.0, float(accept) - (float(run_accept) - float(run_review))), 4)
        return float(accept), review, "the card's recommendation"
    for event in reversed(events):
        if event["version"] == row["version"] and event["accept_threshold"] is not None:
            return float(event["accept_threshold"]), event["review_threshold"], "as when it was last active"
    return float(running.get("accept_threshold", 0.55)), running.get("review_threshold"), "the running ones"


def rollback_target(events: Sequence[Row], active: str) -> str | None:
    """The version active before ``active`` became active: the history replayed as a stack (a promote pushes,
    a rollback pops), so rolling back twice goes two versions back."""
    stack: list[str] = []
    for event in events:
        if event["action"] == "rollback" and stack and stack[-1] == event["previous_version"]:
            stack.pop()
        if not stack or stack[-1] != event["version"]:
            stack.append(event["version"])
    while stack and stack[-1] == active:
        stack.pop()
    return stack[-1] if stack else None


@dataclass(frozen=True)
class Promotion:
    """What a promote or rollback did: the history row, the thresholds and what ran before."""

    event: Row
    thresholds_from: str
    replaced: dict[str, Any]


def promote(
    conn: SyncConn,
    version: str,
    *,
    control: ServeControl,
    actor: str,
    app: str = APP_NAME,
    timeout_s: float = 600.0,
) -> Promotion:
    """Deploy ``version`` to the running app (rolling replacement of the replicas), then record it active.

    ``conn`` is an autocommit connection. ModelRefused before Serve is touched when the version cannot run or
    another change holds the lock; ServeControlError when Serve did not take it. Whatever fails after the
    deploy started, the Serve config that ran before is deployed back and nothing is recorded."""
    with store.changing_models(conn):
        return _activate(conn, version, control=control, actor=actor, action="promote", app=app, timeout_s=timeout_s)


def rollback(
    conn: SyncConn, *, control: ServeControl, actor: str, app: str = APP_NAME, timeout_s: float = 600.0
) -> Promotion:
    """Promote the version that was active before the current one, recorded as a rollback."""
    with store.changing_models(conn):
        active = store.active_version(conn)
        if active is None:
            raise ModelRefused("no version is active: nothing to roll back")
        target = rollback_target(store.history(conn), active["version"])
        if target is None:
            raise ModelRefused(f"no version was active before {active['version']}: nothing to roll back to")
        return _activate(conn, target, control=control, actor=actor, action="rollback", app=app, timeout_s=timeout_s)


def _activate(
    conn: SyncConn, version: str, *, control: ServeControl, actor: str, action: Action, app: str, timeout_s: float
) -> Promotion:
    """promote's and rollback's work, with the registry's lock held."""
    row = store.get_version(conn, version)
    if row is None:
        known = ", ".join(r["version"] for r in store.list_versions(conn)) or "none"
        raise ModelRefused(f"unknown model version {version!r} (registered: {known})")
    if version_has_random_weights(version):
        raise ModelRefused(f"{version} has random weights (tests only): it cannot be promoted")
    if row["status"] == "active":
        raise ModelRefused(f"{version} is already the active version")
    check_weights(version, row["weights_path"], row["weights_sha256"])
    details = control.details()
    before, running = reid_args(details, app), user_config(details, app)
    events = store.history(conn)
    accept, review, source = thresholds_for(row, running, events)
    model: dict[str, Any] = {
        "architecture": row["architecture"],
        "weights": row["weights_path"],
        "input_size_px": row["input_size_px"],
    }
    thresholds = {**running, "accept_threshold": accept, "review_threshold": review}
    previous_config = update_reid(control, changes=model, new_user_config=thresholds, app=app, timeout_s=timeout_s)
    try:
        event = store.record_activation(
            conn, version=version, action=action, actor=actor, accept_threshold=accept, review_threshold=review
        )
    except BaseException:
        restore(control, previous_config, app=app, timeout_s=timeout_s)
        raise
    return Promotion(event=event, thresholds_from=source, replaced=before)


class VersionProbe(Protocol):
    """Asks the running app which model version answers."""

    def version(self) -> str:
        """The model version one ReID replica reports."""
        ...


class HandleProbe:
    """A ReID replica's ``describe()`` through a Serve handle (a Ray driver connected to the cluster)."""

    def __init__(self, app: str = APP_NAME) -> None:
        self.app = app

    def version(self) -> str:
        from ray import serve

        handle = serve.get_deployment_handle(REID_DEPLOYMENT, app_name=self.app)
        return str(handle.describe.remote().result(timeout_s=30)["model_version"])


class ApiProbe:
    """``GET /api/models``'s ``serving_version`` (what a ReID replica answers the ingress)."""

    def __init__(self, api: str, key: str) -> None:
        self.url, self.key = api.rstrip("/") + "/api/models", key

    def version(self) -> str:
        resp = httpx.get(self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)
        resp.raise_for_status()
        return str(resp.json()["serving_version"])


def serving_versions(probe: VersionProbe, *, samples: int = CHECK_SAMPLES) -> set[str]:
    """The versions the running replicas report over ``samples`` calls."""
    return {probe.version() for _ in range(samples)}


def default_actor() -> str:
    """The OS user running the command."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return os.environ.get("USER") or "unknown"


def _utc(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _format_list(rows: Sequence[Row]) -> str:
    lines = [f"{'version':<44} {'status':<9} {'top-1':>6} {'accept':>6} {'review':>6}  promoted"]
    for r in rows:
        top1 = "-" if r["top1_known"] is None else f"{100 * r['top1_known']:.1f}%"
        accept = "-" if r["recommended_accept"] is None else f"{r['recommended_accept']:.2f}"
        review = "-" if r["recommended_review"] is None else f"{r['recommended_review']:.2f}"
        promoted = _utc(r["promoted_at"]) if r["promoted_at"] else "-"
        lines.append(f"{r['version']:<44} {r['status']:<9} {top1:>6} {accept:>6} {review:>6}  {promoted}")
    return "\n".join(lines)


def summary(done: Promotion) -> str:
    """What a promote or rollback did, in one line."""
    e = done.event
    return (
        f"{e['action']}: {e['version']} is active (was {e['previous_version'] or 'none'}); by {e['actor']} at"
        f" {_utc(e['at'])}; accept {e['accept_threshold']}, review {e['review_threshold']}"
        f" ({done.thresholds_from}); replaced {done.replaced.get('weights', '?')}"
    )


def _check(args: argparse.Namespace, version: str) -> int:
    key = os.environ.get("TRAILCAM_API_KEY") or (
        args.api_key_file.read_text().strip() if args.api_key_file.is_file() else ""
    )
    if not key:
        print(f"not checked: no API key (TRAILCAM_API_KEY or {args.api_key_file}) to ask {args.api}")
        return 0
    try:
        seen = serving_versions(ApiProbe(args.api, key))
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        print(f"error: could not ask {args.api} which version it serves: {exc}", file=sys.stderr)
        return 1
    if seen != {version}:
        print(f"error: the running replicas report {', '.join(sorted(seen))}, not {version}", file=sys.stderr)
        return 1
    print(f"checked: the running replicas report {version}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m batch.models", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="Postgres DSN (default: TRAILCAM_DATABASE_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", parents=[common], help="store a model card in the registry")
    reg.add_argument("card", type=Path)
    reg.add_argument("--status", choices=("candidate", "active"), default="candidate", help="active: it runs now")
    reg.add_argument("--actor", default=default_actor(), help="who records it (default: the OS user)")
    sub.add_parser("list", parents=[common], help="versions with status, top-1 and recommended thresholds")
    for name in ("promote", "rollback"):
        cmd = sub.add_parser(name, parents=[common], help=f"{name} the running app's model")
        if name == "promote":
            cmd.add_argument("version")
        cmd.add_argument("--actor", default=default_actor(), help="who does it (default: the OS user)")
        cmd.add_argument("--dashboard", help="Ray dashboard (default: RAY_DASHBOARD_ADDRESS, else 127.0.0.1:8265)")
        cmd.add_argument("--api", default=DEFAULT_API, help="the app's HTTP address, for the check afterwards")
        cmd.add_argument("--api-key-file", type=Path, default=DEFAULT_KEY_FILE, help="or TRAILCAM_API_KEY")
        cmd.add_argument("--timeout", type=float, default=600.0, help="seconds Serve may take to replace replicas")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    with connect(args.database_url or get_settings().database_dsn, autocommit=True) as conn:
        try:
            if args.command == "register":
                record, new = register(conn, args.card, active=args.status == "active", actor=args.actor)
                status = store.get_version(conn, record.version)
                print(f"{'registered' if new else 'updated'} {record.version} ({status['status'] if status else '?'})")
                return 0
            if args.command == "list":
                print(_format_list(store.list_versions(conn)))
                return 0
            control = DashboardControl(args.dashboard)
            if args.command == "promote":
                done = promote(conn, args.version, control=control, actor=args.actor, timeout_s=args.timeout)
            else:
                done = rollback(conn, control=control, actor=args.actor, timeout_s=args.timeout)
        except ModelRefused as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 2
        except ServeControlError as exc:
            print(f"error: {exc}; nothing was recorded", file=sys.stderr)
            return 1
    print(summary(done))
    return _check(args, str(done.event["version"]))


if __name__ == "__main__":
    raise SystemExit(main())
