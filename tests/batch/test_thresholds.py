"""The threshold guard on real report rows: which stored report ``apply`` reads, when it refuses and why, the
evidence it records, and the history it prints (no Serve here; tests/batch/test_thresholds_serve.py applies)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from batch.thresholds import Guard, Running, judge, main
from serve_app.reid.decision import Thresholds
from serve_app.store.reports import store_report
from serve_app.store.threshold_history import (
    ThresholdChange,
    latest_all_sites_report,
    record_change,
    report_by_id,
)

VERSION = "resnet18-0123456789ab-64"
RUNNING = Running(VERSION, Thresholds(0.55, None), {"accept_threshold": 0.55, "review_threshold": None})


def point(threshold: float, precision: float | None, assigned: int = 40) -> dict[str, Any]:
    return {
        "threshold": threshold, "assigned": assigned, "precision": precision, "known_assigned": 0.5,
        "known_correct": 0.5, "strangers_unassigned": 0.9, "baks": 0.5, "baus": 0.9,
    }  # fmt: skip


def a_report(*, known: int = 180, strangers: int = 40, recommended: float = 0.7, review: float | None = 0.5,
             random_weights: bool = False) -> dict[str, Any]:  # fmt: skip
    """A report in the shape batch.analyze stores: precision 0.90 at 0.60, 0.97 at 0.70, 0.99 at 0.80."""
    curve = [point(0.5, 0.8), point(0.6, 0.9), point(0.7, 0.97), point(0.8, 0.99, assigned=5)]
    return {
        "model_version": VERSION,
        "random_weights": random_weights,
        "recommended_threshold": recommended,
        "recommendation_source": "lowest threshold with precision >= 0.95",
        "recommendation_trusted": True,
        "review_threshold": review,
        "current_threshold": 0.55,
        "labelled": {"samples": 0, "per_threshold": [], "f1_best": None},
        "decision_quality": {
            "source": "demo ground truth",
            "known_queries": known,
            "stranger_queries": strangers,
            "top1_known": 0.9,
            "precision_target": 0.95,
            "recommended": {"threshold": recommended, "reason": "lowest threshold with precision >= 0.95"},
            "at_recommended": next((p for p in curve if p["threshold"] == recommended), None),
            "curve": curve,
        },
    }


def stored(db: psycopg.Connection[Any], report: dict[str, Any], *, version: str = VERSION,
           sites: list[int] | None = None) -> int:  # fmt: skip
    return store_report(db, model_version=version, sites=sites, report=report)


def verdict_on(db: psycopg.Connection[Any], report_id: int, guard: Guard = Guard()) -> Any:
    row = report_by_id(db, report_id)
    assert row is not None
    return judge(row, running=RUNNING, guard=guard)


def test_evidence_that_holds_is_allowed_with_the_reports_thresholds_and_figures(db: psycopg.Connection[Any]) -> None:
    rid = stored(db, a_report())
    verdict = verdict_on(db, rid)
    assert verdict.allowed and verdict.refusals == ()
    assert verdict.proposed == Thresholds(0.7, 0.5)
    assert verdict.evidence | {"report_created_at": None} == {
        "labelled_samples": 220,
        "labels_source": "demo ground truth",
        "min_labels": 200,
        "precision": 0.97,
        "precision_at": 0.7,
        "precision_target": 0.95,
        "recommendation_source": "lowest threshold with precision >= 0.95",
        "report_created_at": None,
    }


def test_latest_is_the_newest_all_sites_report_of_the_running_version(db: psycopg.Connection[Any]) -> None:
    site = db.execute("INSERT INTO sites (name) VALUES ('s') RETURNING id").fetchone()["id"]
    mine = stored(db, a_report())
    stored(db, a_report(), version="resnet18-ffffffffffff-64")  # newer, another model
    stored(db, a_report(), sites=[site])  # newer, one site only
    latest = latest_all_sites_report(db, VERSION)
    assert latest is not None and latest["id"] == mine
    assert latest_all_sites_report(db, "resnet18-000000000000-64") is None


def test_too_few_labels_are_refused_and_the_minimum_is_configurable(db: psycopg.Connection[Any]) -> None:
    rid = stored(db, a_report(known=100, strangers=50))
    verdict = verdict_on(db, rid)
    assert not verdict.allowed
    assert verdict.refusals == ("150 labelled detections (demo ground truth), fewer than the 200 required",)
    assert verdict_on(db, rid, Guard(min_labels=150)).allowed


def test_precision_below_the_target_is_refused_and_the_target_is_configurable(db: psycopg.Connection[Any]) -> None:
    rid = stored(db, a_report(recommended=0.6))
    verdict = verdict_on(db, rid)
    assert verdict.refusals == ("precision 0.900 at 0.6 is below the target 0.95",)
    assert verdict_on(db, rid, Guard(precision_target=0.9)).allowed


def test_a_report_for_another_model_version_is_refused(db: psycopg.Connection[Any]) -> None:
    rid = stored(db, a_report(), version="resnet18-ffffffffffff-64")
    (reason,) = verdict_on(db, rid).refusals
    assert reason == f"report {rid} is for model resnet18-ffffffffffff-64; the app runs {VERSION}"


def test_random_weights_are_refused_by_the_reports_flag_or_the_version_name(db: psycopg.Connection[Any]) -> None:
    flagged = stored(db, a_report(random_weights=True))
    assert verdict_on(db, flagged).refusals == (
        f"report {flagged} is for random weights: its similarities and figures mean nothing",
    )
    random_version = "resnet18-random-seed7-64"
    named = stored(db, a_report(), version=random_version)
    row = report_by_id(db, named)
    assert row is not None
    verdict = judge(row, running=Running(random_version, Thresholds(0.55), {}), guard=Guard())
    assert verdict.refusals == (f"report {named} is for random weights: its similarities and figures mean nothing",)


def test_a_report_over_some_sites_only_is_refused(db: psycopg.Connection[Any]) -> None:
    site = db.execute("INSERT INTO sites (name) VALUES ('s') RETURNING id").fetchone()["id"]
    rid = stored(db, a_report(), sites=[site])
    assert verdict_on(db, rid).refusals == (f"report {rid} covers sites [{site}] only; thresholds apply to every site",)


def test_every_failed_rule_is_named(db: psycopg.Connection[Any]) -> None:
    rid = stored(db, a_report(known=10, strangers=0, recommended=0.6, random_weights=True))
    assert len(verdict_on(db, rid).refusals) == 3


def test_manual_decisions_without_a_precision_figure_are_refused(db: psycopg.Connection[Any]) -> None:
    report = a_report()
    report["decision_quality"] = None
    report["labelled"]["samples"] = 500
    rid = stored(db, report)
    refusals = verdict_on(db, rid).refusals
    assert f"report {rid} has no precision figure at 0.7 (no labelled decision quality)" in refusals
    assert any("does not come from the labelled rule" in r for r in refusals) and len(refusals) == 2


def test_a_mixture_fit_fallback_is_refused_even_where_precision_holds(db: psycopg.Connection[Any]) -> None:
    # No threshold met the labelled rule, so batch.analyze fell back to the mixture fit's threshold.
    report = a_report(recommended=0.8)
    report["recommendation_source"] = "two-Gaussian mixture fit"
    report["recommendation_trusted"] = False
    report["decision_quality"]["recommended"] = {"threshold": None, "reason": "no threshold meets the rule"}
    rid = stored(db, report)
    (reason,) = verdict_on(db, rid).refusals
    assert "does not come from the labelled rule (two-Gaussian mixture fit)" in reason


def test_a_review_threshold_above_the_accept_threshold_is_refused(db: psycopg.Connection[Any]) -> None:
    rid = stored(db, a_report(review=0.9))
    (reason,) = verdict_on(db, rid).refusals
    assert reason.startswith(f"report {rid}'s thresholds cannot be applied: review_threshold")


def test_without_a_review_threshold_the_current_band_stays_while_it_lies_below(db: psycopg.Connection[Any]) -> None:
    rid = stored(db, a_report(review=None))
    row = report_by_id(db, rid)
    assert row is not None
    with_band = Running(VERSION, Thresholds(0.55, 0.4), {})
    assert judge(row, running=with_band, guard=Guard()).proposed == Thresholds(0.7, 0.4)
    above = Running(VERSION, Thresholds(0.9, 0.8), {})
    assert judge(row, running=above, guard=Guard()).proposed == Thresholds(0.7, None)


def test_history_prints_the_recorded_changes_newest_first(
    db: psycopg.Connection[Any], database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--database-url", database_url, "history"]) == 0
    assert capsys.readouterr().out == "no threshold changes recorded\n"
    rid = stored(db, a_report())
    base = ThresholdChange("alice", VERSION, 0.55, None, 0.7, 0.5, rid, {"precision": 0.97})
    first = record_change(db, base)
    second = record_change(db, ThresholdChange("raycronjob/weekly", VERSION, 0.7, 0.5, 0.65, None, rid, {}))
    assert main(["--database-url", database_url, "history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [str(second), str(first)]
    assert "raycronjob/weekly" in lines[0] and "accept 0.7 -> 0.65, review 0.5 -> None" in lines[0]
    assert "alice" in lines[1] and f"report {rid}" in lines[1] and '"precision": 0.97' in lines[1]


def test_a_change_must_rest_on_a_stored_report(db: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        record_change(db, ThresholdChange("alice", VERSION, 0.55, None, 0.7, None, 999_999, {}))


@pytest.mark.parametrize(
    "args",
    [
        ["--report", "newest"],
        ["--report", "0"],
        ["--precision-target", "1.5"],
        ["--min-labels", "-1"],
        ["--actor", " "],
    ],
)
def test_bad_apply_arguments_are_refused_before_anything_runs(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["apply", *args])
    assert exited.value.code == 2
