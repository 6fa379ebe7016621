"""Guarded threshold changes: apply a threshold report's recommendation to the running app only when its evidence
holds, verify the replicas took it, and record it.

    python -m batch.thresholds apply --report latest|ID [--min-labels N] [--precision-target P] [--actor NAME]
                                     [--dashboard URL] [--app NAME] [--dry-run]
    python -m batch.thresholds history [--limit N]

``apply`` asks the running ReID replicas (``describe()``) which model version they serve and reads the report
(``latest``: the newest all-sites report of that version). It applies the report's recommended accept threshold
and its review threshold only when the report is for the model version running now, over all sites, not for
random weights, rests on at least ``--min-labels`` labelled detections and the precision at the new accept
threshold reaches ``--precision-target``. The change goes through batch/serve_control.py as a ``user_config``
update (``reconfigure``: no replica restarts), is verified on every replica, then recorded in
``threshold_changes`` (GET /api/reid/thresholds/history).

Exit status: 0 applied, a dry run the guard allows, or "no change" (already at the recommended thresholds;
nothing recorded); 3 refused by the guard (each reason printed; nothing changed or recorded); 1 Serve or
Postgres failed. The replicas are asked through Ray: run it as a job on the serving cluster (``ray job
submit --address <dashboard> -- python -m batch.thresholds apply ...``) or with RAY_ADDRESS pointing there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from batch.quality import DEFAULT_PRECISION_TARGET
from batch.serve_control import (
    APP_NAME,
    REID_DEPLOYMENT,
    ClientControl,
    DashboardControl,
    ServeControl,
    ServeControlError,
    restore,
    update_reid,
    user_config,
)
from serve_app.config import get_settings
from serve_app.errors import ModelRefused
from serve_app.reid.decision import Thresholds
from serve_app.reid.model_spec import version_has_random_weights
from serve_app.store.db import connect
from serve_app.store.models import changing_models
from serve_app.store.reports import StoredReport
from serve_app.store.threshold_history import (
    ThresholdChange,
    changes,
    latest_all_sites_report,
    record_change,
    report_by_id,
)

logger = logging.getLogger(__name__)

DEFAULT_MIN_LABELS = 200
"""Fewest labelled detections (known and strangers) a threshold change may rest on."""
DEFAULT_ACTOR = "batch.thresholds"
VERIFY_TIMEOUT_S = 60.0
"""How long every replica has to report the new thresholds once Serve says the app runs them, seconds."""
REFUSED = 3
FAILED = 1
LATEST = "latest"


@dataclass(frozen=True)
class Guard:
    """What a report's evidence must reach before its thresholds are applied."""

    min_labels: int = DEFAULT_MIN_LABELS
    precision_target: float = DEFAULT_PRECISION_TARGET


@dataclass(frozen=True)
class Running:
    """What the replicas run: model version, thresholds, and the deployed user_config they come from."""

    model_version: str
    thresholds: Thresholds
    user_config: dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    """The guard's answer on one report: why not (empty: allowed), the thresholds it proposes, the evidence."""

    report_id: int | None
    refusals: tuple[str, ...]
    proposed: Thresholds | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        """True when every rule holds."""
        return not self.refusals and self.proposed is not None


@dataclass(frozen=True)
class Outcome:
    """What ``apply`` did: applied, no change, refused or dry run, and the recorded change's id when applied."""

    status: Literal["applied", "no change", "refused", "dry run"]
    running: Running
    verdict: Verdict
    change_id: int | None = None


def _same(a: Any, b: float) -> bool:
    return a is not None and abs(float(a) - b) < 5e-5


def labelled_samples(report: dict[str, Any]) -> tuple[int, str]:
    """Labelled detections behind the report and where their labels come from: the decision-quality queries
    (known and strangers) when there are any, else the manual decisions counted in ``labelled.samples``."""
    quality = report.get("decision_quality")
    if quality:
        n = int(quality.get("known_queries") or 0) + int(quality.get("stranger_queries") or 0)
        return n, str(quality.get("source") or "decision quality")
    return int((report.get("labelled") or {}).get("samples") or 0), "manual decisions"


def precision_at(report: dict[str, Any], threshold: float) -> float | None:
    """Assignment precision at ``threshold`` from the report's decision quality (``at_recommended`` or the
    curve point at that threshold); None when the report has no such figure."""
    quality = report.get("decision_quality") or {}
    points = [quality.get("at_recommended") or {}, *(quality.get("curve") or [])]
    point = next((p for p in points if _same(p.get("threshold"), threshold)), None)
    return None if point is None or point.get("precision") is None else float(point["precision"])


def judge(stored: StoredReport, *, running: Running, guard: Guard) -> Verdict:
    """Whether a stored report may set the running app's thresholds, every failed rule with its reason."""
    report, rid = stored["report"], stored["id"]
    refusals = []
    if stored["model_version"] != running.model_version:
        refusals.append(f"report {rid} is for model {stored['model_version']}; the app runs {running.model_version}")
    if report.get("random_weights") or version_has_random_weights(stored["model_version"]):
        refusals.append(f"report {rid} is for random weights: its similarities and figures mean nothing")
    if stored["site_ids"] is not None:
        refusals.append(f"report {rid} covers sites {stored['site_ids']} only; thresholds apply to every site")
    samples, source = labelled_samples(report)
    if samples < guard.min_labels:
        refusals.append(f"{samples} labelled detections ({source}), fewer than the {guard.min_labels} required")
    recommended = report.get("recommended_threshold")
    if recommended is None:
        return Verdict(rid, (*refusals, f"report {rid} recommends no threshold"))
    accept = round(float(recommended), 4)
    by_rule = ((report.get("decision_quality") or {}).get("recommended") or {}).get("threshold")
    if not report.get("recommendation_trusted") or by_rule is None or not _same(by_rule, accept):
        refusals.append(
            f"report {rid}'s threshold {accept} does not come from the labelled rule"
            f" ({report.get('recommendation_source')}): only a precision-target recommendation is applied"
        )
    precision = precision_at(report, accept)
    if precision is None:
        refusals.append(f"report {rid} has no precision figure at {accept} (no labelled decision quality)")
    elif precision < guard.precision_target:
        refusals.append(f"precision {precision:.3f} at {accept} is below the target {guard.precision_target}")
    review = report.get("review_threshold")
    if review is None:  # the report names no review band: keep the current one while it lies below accept
        review = running.thresholds.review
        review = review if review is not None and review <= accept else None
    try:
        proposed: Thresholds | None = Thresholds(accept, None if review is None else round(float(review), 4))
    except ValueError as exc:
        proposed = None
        refusals.append(f"report {rid}'s thresholds cannot be applied: {exc}")
    evidence = {
        "labelled_samples": samples,
        "labels_source": source,
        "min_labels": guard.min_labels,
        "precision": precision,
        "precision_at": accept,
        "precision_target": guard.precision_target,
        "recommendation_source": report.get("recommendation_source"),
        "report_created_at": stored["created_at"].isoformat(),
    }
    return Verdict(rid, tuple(refusals), proposed, evidence)


def _running_pids(control: ServeControl, app: str) -> set[int]:
    deployment = ((control.details().get("applications") or {}).get(app) or {}).get("deployments") or {}
    replicas = (deployment.get(REID_DEPLOYMENT) or {}).get("replicas") or []
    return {int(r["pid"]) for r in replicas if r.get("state") == "RUNNING" and r.get("pid") is not None}


def describe_replicas(
    control: ServeControl,
    *,
    app: str,
    until: Callable[[dict[str, Any]], bool] = lambda d: True,
    timeout_s: float = VERIFY_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """``describe()`` of every RUNNING ReID replica Serve lists, each answer satisfying ``until``. A handle sends a
    call to one replica, so the replicas are asked until each (by pid) has answered; ServeControlError after
    ``timeout_s``."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    answers: dict[int, dict[str, Any]] = {}
    try:
        handle = serve.get_deployment_handle(REID_DEPLOYMENT, app_name=app)
    except Exception as exc:  # Serve raises several kinds; each means the same here
        raise ServeControlError(f"cannot reach the ReID deployment of {app!r}: {exc}") from exc
    while True:
        pids = _running_pids(control, app)
        try:
            answer = dict(handle.describe.remote().result(timeout_s=timeout_s))
        except Exception as exc:  # as above: a replica that cannot answer
            raise ServeControlError(f"a ReID replica of {app!r} did not answer describe(): {exc}") from exc
        answers[int(answer["pid"])] = answer
        good = {pid for pid, a in answers.items() if until(a)}
        if pids and pids <= good:
            return [answers[pid] for pid in sorted(pids)]
        if time.monotonic() > deadline:
            waiting = {pid: answers.get(pid) for pid in pids - good}
            raise ServeControlError(
                f"ReID replicas of {app!r} did not report as expected in {timeout_s:.0f} s: {waiting}"
            )
        if answer["pid"] not in good:
            time.sleep(0.2)  # it may still be catching up: its next answer replaces this one


def running_app(control: ServeControl, *, app: str) -> Running:
    """The model version and thresholds the app's replicas report, and the deployed user_config."""
    replicas = describe_replicas(control, app=app)
    seen = {(r["model_version"], r["accept_threshold"], r["review_threshold"]) for r in replicas}
    if len(seen) != 1:
        raise ServeControlError(f"the ReID replicas of {app!r} disagree (model, accept, review): {seen}")
    ((version, accept, review),) = seen
    return Running(str(version), Thresholds(accept, review), user_config(control.details(), app))


def apply(
    dsn: str,
    control: ServeControl,
    *,
    report: str | int = LATEST,
    guard: Guard = Guard(),
    actor: str = DEFAULT_ACTOR,
    app: str = APP_NAME,
    dry_run: bool = False,
) -> Outcome:
    """Apply a report's thresholds to the running app when the guard allows it, verify, record (see the module
    docstring). Raises ServeControlError when Serve cannot be read or changed, or a replica does not take it."""
    with connect(dsn, autocommit=True) as lock, changing_models(lock):
        return _apply_locked(dsn, control, report=report, guard=guard, actor=actor, app=app, dry_run=dry_run)


def _apply_locked(
    dsn: str, control: ServeControl, *, report: str | int, guard: Guard, actor: str, app: str, dry_run: bool
) -> Outcome:
    running = running_app(control, app=app)
    with connect(dsn) as conn:
        if report == LATEST:
            stored = latest_all_sites_report(conn, running.model_version)
            missing = f"no all-sites threshold report for the running model {running.model_version}"
        else:
            stored = report_by_id(conn, int(report))
            missing = f"no threshold report {report}"
    if stored is None:
        return Outcome("refused", running, Verdict(None, (missing,)))
    verdict = judge(stored, running=running, guard=guard)
    if not verdict.allowed or verdict.proposed is None:
        return Outcome("refused", running, verdict)
    if verdict.proposed == running.thresholds:
        return Outcome("no change", running, verdict)
    if dry_run:
        return Outcome("dry run", running, verdict)
    new = verdict.proposed
    previous_config = update_reid(
        control,
        new_user_config={**running.user_config, "accept_threshold": new.accept, "review_threshold": new.review},
        app=app,
    )
    change = ThresholdChange(
        actor=actor,
        model_version=running.model_version,
        from_accept=running.thresholds.accept,
        from_review=running.thresholds.review,
        to_accept=new.accept,
        to_review=new.review,
        report_id=int(stored["id"]),
        evidence=verdict.evidence,
    )
    try:
        describe_replicas(
            control,
            app=app,
            until=lambda d: (
                (d["model_version"], d["accept_threshold"], d["review_threshold"])
                == (running.model_version, new.accept, new.review)
            ),
        )
        with connect(dsn) as conn:
            change_id = record_change(conn, change)
    except BaseException as exc:
        # Not taken by every replica, interrupted, or not recorded: no threshold serves without its history row.
        restore(control, previous_config, app=app)
        if isinstance(exc, ServeControlError):
            raise ServeControlError(f"{_band(new)} was not taken by every replica, so it was undone: {exc}") from exc
        raise
    return Outcome("applied", running, verdict, change_id)


def _band(t: Thresholds) -> str:
    return f"accept {t.accept}, review {'none' if t.review is None else t.review}"


def _print_outcome(outcome: Outcome) -> int:
    running, verdict = outcome.running, outcome.verdict
    print(f"running: model {running.model_version}, {_band(running.thresholds)}")
    if outcome.status == "refused":
        print(f"refused: nothing changed (report {verdict.report_id})")
        for reason in verdict.refusals:
            print(f"  - {reason}")
        return REFUSED
    assert verdict.proposed is not None
    evidence = verdict.evidence
    print(
        f"evidence (report {verdict.report_id}): {evidence['labelled_samples']} labelled detections"
        f" ({evidence['labels_source']}), precision {evidence['precision']:.3f} at {evidence['precision_at']}"
        f" (target {evidence['precision_target']})"
    )
    if outcome.status == "no change":
        print(f"no change: already at {_band(verdict.proposed)}")
    elif outcome.status == "dry run":
        print(f"dry run: would change to {_band(verdict.proposed)}")
    else:
        print(f"applied: {_band(running.thresholds)} -> {_band(verdict.proposed)} (change {outcome.change_id})")
    return 0


def _print_history(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no threshold changes recorded")
    for r in rows:
        print(
            f"{r['id']}  {r['at'].isoformat(timespec='seconds')}  {r['actor']}  {r['model_version']}"
            f"  accept {r['from_accept']} -> {r['to_accept']}, review {r['from_review']} -> {r['to_review']}"
            f"  report {r['report_id']}  {json.dumps(r['evidence'], sort_keys=True)}"
        )


def _connect_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False, logging_level=logging.WARNING)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _report_ref(text: str) -> str | int:
    if text == LATEST:
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("'latest' or a report id")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """CLI (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m batch.thresholds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="default: TRAILCAM_DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)
    do = sub.add_parser("apply", help="apply a report's thresholds to the running app when its evidence holds")
    do.add_argument("--report", type=_report_ref, default=LATEST, help="'latest' (default) or a report id")
    do.add_argument("--min-labels", type=int, default=DEFAULT_MIN_LABELS, help="default %(default)s")
    do.add_argument("--precision-target", type=_fraction, default=DEFAULT_PRECISION_TARGET, help="default %(default)s")
    do.add_argument("--actor", default=DEFAULT_ACTOR, help="who or what changes it (default %(default)s)")
    do.add_argument("--dashboard", help="change the app through Serve's REST API on this Ray dashboard")
    do.add_argument("--app", default=APP_NAME, help="the Serve application (default %(default)s)")
    do.add_argument("--dry-run", action="store_true", help="judge and print; change nothing")
    hist = sub.add_parser("history", help="print the recorded threshold changes, newest first")
    hist.add_argument("--limit", type=int, default=50)
    args = parser.parse_args(argv)
    if args.command == "apply" and (args.min_labels < 0 or not args.actor.strip() or len(args.actor) > 200):
        parser.error("--min-labels must be >= 0 and --actor 1 to 200 characters")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    dsn = args.database_url or get_settings().database_dsn
    if args.command == "history":
        with connect(dsn) as conn:
            _print_history(changes(conn, limit=max(args.limit, 1)))
        return 0
    control: ServeControl = DashboardControl(args.dashboard) if args.dashboard else ClientControl()
    try:
        _connect_ray()
        outcome = apply(
            dsn,
            control,
            report=args.report,
            guard=Guard(args.min_labels, args.precision_target),
            actor=args.actor.strip(),
            app=args.app,
            dry_run=args.dry_run,
        )
    except ModelRefused as exc:  # another change of the running app holds the lock
        print(f"refused: {exc}", file=sys.stderr)
        return REFUSED
    except (ServeControlError, ConnectionError, psycopg.Error) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return FAILED
    return _print_outcome(outcome)


if __name__ == "__main__":
    raise SystemExit(main())
