"""Threshold analysis of one model version's similarity log: report.md, report.json and histogram.png.

``python -m batch.analyze --model-version V --out DIR [--site ID ...]`` (also submittable with
``ray job submit ... -- python -m batch.analyze ...``). The report is also stored in Postgres, where
``GET /api/reid/threshold-report`` serves the latest one for the caller's sites. ``--compare W`` (repeatable)
adds other versions side by side (comparison.md, comparison.png; see batch/compare.py).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib
import psycopg

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from batch.compare import draw_comparison, render_comparison
from batch.quality import DEFAULT_PRECISION_TARGET, DEFAULT_STRANGER_TARGET
from batch.report import build_report
from serve_app.config import get_settings
from serve_app.reid.decision import DEFAULT_ACCEPT_THRESHOLD
from serve_app.store.db import connect
from serve_app.store.reports import store_report

logger = logging.getLogger(__name__)

BAR_COLOR = "#4c72b0"
CURRENT_COLOR = "#d62728"
RECOMMENDED_COLOR = "#2ca02c"


def draw_histogram(report: dict[str, Any], path: Path) -> None:
    """Bars of top-1 similarities with the current (red) and recommended (green) thresholds."""
    edges = report["histogram"]["edges"]
    counts = report["histogram"]["counts"]
    nonzero = [i for i, c in enumerate(counts) if c]
    lo = edges[nonzero[0]] if nonzero else 0.0
    hi = edges[nonzero[-1] + 1] if nonzero else 1.0
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color=BAR_COLOR, label="top-1 similarity")
    current, recommended = report["current_threshold"], report["recommended_threshold"]
    trusted = "" if report["recommendation_trusted"] else " (not trustworthy)"
    ax.axvline(current, color=CURRENT_COLOR, linewidth=2.5, label=f"current threshold {current:.2f}")
    ax.axvline(recommended, color=RECOMMENDED_COLOR, linewidth=2.5,
               label=f"recommended {recommended:.3f}{trusted}")  # fmt: skip
    ax.set_xlim(min(lo, current, recommended) - 0.05, max(hi, current, recommended) + 0.05)
    ax.set_xlabel("top-1 cosine similarity")
    ax.set_ylabel("detections")
    title = f"{report['model_version']}: {report['detections']} detections"
    ax.set_title(title + (" - RANDOM WEIGHTS, meaningless" if report["random_weights"] else ""))
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: warnings first, then the recommendation and the tables."""
    scope = "all sites" if report["site_ids"] is None else "sites " + ", ".join(map(str, report["site_ids"]))
    lines = [f"# Threshold report: {report['model_version']}", "", f"Scope: {scope}; {report['detections']} "
             "detections (latest top-1 score each; manual assignments excluded).", ""]  # fmt: skip
    lines += [f"**Warning:** {w}" for w in report["warnings"]] + ([""] if report["warnings"] else [])
    mixture = report["mixture"]
    lines += [
        "## Recommendation",
        "",
        f"- Current threshold: {report['current_threshold']:.2f}",
        f"- Recommended threshold: {report['recommended_threshold']:.3f} ({report['recommendation_source']})"
        + (
            ""
            if report["decision_quality"] and report["decision_quality"]["recommended"]["threshold"] is not None
            else " - " + (mixture["reason"] if mixture else "no scores")
        ),
        f"- Review band from: {report['review_threshold']} (assignments there right at least half the time)",
        f"- Trust it: {'yes' if report['recommendation_trusted'] else 'NO'}",
        "",
        "![histogram](histogram.png)",
        "",
        "## Assignment rate per threshold",
        "",
        "| threshold | assigned | rate |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['threshold']:.2f} | {r['assigned']} | {_pct(r['rate'])} |" for r in report["assignment_rates"]]
    labelled = report["labelled"]
    lines += ["", "## Against manual decisions", ""]
    if labelled["samples"]:
        best = labelled["f1_best"]
        lines += [f"{labelled['samples']} manual decisions scored before review. F1-best threshold: "
                  f"{best['threshold']:.2f} (F1 {best['f1']:.3f}).", "",
                  "| threshold | precision | recall | F1 |", "|---:|---:|---:|---:|"]  # fmt: skip
        lines += [
            f"| {r['threshold']:.2f} | {_pct(r['precision'])} | {_pct(r['recall'])} | {r['f1']} |"
            for r in labelled["per_threshold"]
        ]
    else:
        lines.append("No manual decisions with a score computed before the review: no precision/recall.")
    quality = report["decision_quality"]
    if quality:
        at = quality["at_recommended"] or {}
        lines += ["", f"## Decision quality (against {quality['source']})", "",
                  f"- top-1 on known individuals: {_pct(quality['top1_known'])} of {quality['known_queries']};"
                  f" {quality['stranger_queries']} stranger detections",
                  f"- precision target {quality['precision_target']}: {quality['recommended']['reason']}",
                  f"- at it: precision {_pct(at.get('precision'))}, known assigned {_pct(at.get('known_assigned'))},"
                  f" strangers left unassigned {_pct(at.get('strangers_unassigned'))}, BAKS {_pct(at.get('baks'))},"
                  f" BAUS {_pct(at.get('baus'))}", "",
                  "| threshold | precision | known assigned | strangers unassigned | BAKS | BAUS |",
                  "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines += [
            f"| {p['threshold']:.2f} | {_pct(p['precision'])} | {_pct(p['known_assigned'])} "
            f"| {_pct(p['strangers_unassigned'])} | {_pct(p['baks'])} | {_pct(p['baus'])} |"
            for p in quality["curve"]
            if round(p["threshold"] * 100) % 5 == 0
        ]
    truth = report["ground_truth"]
    if truth:
        lines += ["", "## Against the demo ground truth", ""]
        if report["random_weights"]:
            lines += ["These figures are meaningless: the model has random weights.", ""]
        lines += ["| threshold | precision | recall | strangers left unassigned |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {r['threshold']:.3f} | {_pct(r['precision'])} | {_pct(r['recall'])} "
            f"| {_pct(r['correct_unassigned_rate'])} |"
            for r in truth["per_threshold"]
        ]
    return "\n".join(lines) + "\n"


LATEST = "latest"
# The model version the online path used last (what a weekly report should look at).
LATEST_VERSION_SQL = (
    "SELECT model_version FROM reid_similarity_scores ORDER BY (source = 'online') DESC, computed_at DESC LIMIT 1"
)


def resolve_model_version(conn: psycopg.Connection[Any], model_version: str) -> str:
    """``latest`` -> the newest logged model version (online rows first); other values as given."""
    if model_version != LATEST:
        return model_version
    row = conn.execute(LATEST_VERSION_SQL).fetchone()
    if row is None:
        raise ValueError("--model-version latest: no similarity scores are logged yet")
    return str(row["model_version"])


def analyze(
    dsn: str, *, model_version: str, out: Path, sites: list[int] | None = None,
    current_threshold: float = DEFAULT_ACCEPT_THRESHOLD, store: bool = True,
    precision_target: float = DEFAULT_PRECISION_TARGET, stranger_target: float = DEFAULT_STRANGER_TARGET,
) -> dict[str, Any]:  # fmt: skip
    """Build, write and store the report; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    with connect(dsn) as conn:
        model_version = resolve_model_version(conn, model_version)
        report = build_report(
            conn, model_version=model_version, sites=sites, current_threshold=current_threshold,
            precision_target=precision_target, stranger_target=stranger_target,
        )  # fmt: skip
        if store:
            report["report_id"] = store_report(conn, model_version=model_version, sites=sites, report=report)
            conn.commit()
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report))
    draw_histogram(report, out / "histogram.png")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-version", required=True, help="a model version, or 'latest' (newest logged)")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json, histogram.png")
    parser.add_argument("--site", type=int, action="append", dest="sites", help="site id (repeatable; default all)")
    parser.add_argument("--current-threshold", type=float, default=DEFAULT_ACCEPT_THRESHOLD)
    parser.add_argument(
        "--precision-target",
        type=float,
        default=DEFAULT_PRECISION_TARGET,
        help="assignment precision the recommended threshold must reach (default %(default)s)",
    )
    parser.add_argument(
        "--stranger-target",
        type=float,
        default=DEFAULT_STRANGER_TARGET,
        help="share of labelled strangers it must leave unassigned (default %(default)s)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="VERSION",
        help="another model version to put side by side (repeatable)",
    )
    parser.add_argument("--no-store", action="store_true", help="do not store the report in Postgres")
    parser.add_argument("--database-url", help="default: TRAILCAM_DATABASE_URL")
    args = parser.parse_args(argv)
    for name in ("precision_target", "stranger_target"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    common = {
        "sites": sorted(set(args.sites)) if args.sites else None, "current_threshold": args.current_threshold,
        "store": not args.no_store, "precision_target": args.precision_target,
        "stranger_target": args.stranger_target,
    }  # fmt: skip
    dsn = args.database_url or get_settings().database_dsn
    try:
        report = analyze(dsn, model_version=args.model_version, out=args.out, **common)
        compared = [
            analyze(dsn, model_version=version, out=args.out / f"compare-{n}", **common)
            for n, version in enumerate(args.compare, start=1)
        ]
    except ValueError as exc:
        parser.error(str(exc))
    if compared:
        (args.out / "comparison.md").write_text(render_comparison([report, *compared]))
        draw_comparison([report, *compared], args.out / "comparison.png")
        print(f"wrote {args.out / 'comparison.md'} and comparison.png ({1 + len(compared)} model versions)")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    trusted = "trusted" if report["recommendation_trusted"] else "NOT trusted"
    print(f"{report['detections']} detections; recommended threshold {report['recommended_threshold']:.3f} ({trusted})")
    print(f"wrote {args.out / 'report.md'}, report.json, histogram.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
