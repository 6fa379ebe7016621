"""Model versions side by side for the promote decision: comparison.md and comparison.png.

``python -m batch.analyze --model-version A --compare B [--compare C] --out DIR`` writes A's report in DIR,
each compared version's report in ``DIR/compare-<n>/``, and, in DIR, one table of the figures that decide a
promotion (top-1, the recommended threshold and precision / known assigned / strangers left unassigned at
it, assignment rates) plus overlaid histograms, assignment rates and precision curves for every version.
The versions must have scored the same detections (a backfill per version) for the figures to compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _rate_at(report: dict[str, Any], threshold: float) -> float | None:
    """Share of the report's detections whose top-1 similarity is >= threshold (from its histogram)."""
    edges, counts = report["histogram"]["edges"], report["histogram"]["counts"]
    total = sum(counts)
    if not total:
        return None
    assigned = sum(int(c) for lo, c in zip(edges[:-1], counts, strict=True) if lo >= threshold - 1e-9)
    return assigned / float(total)


def summary_row(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a promotion is decided on, for one report."""
    quality = report["decision_quality"] or {}
    at = quality.get("at_recommended") or {}
    recommended = report["recommended_threshold"]
    return {
        "model_version": report["model_version"],
        "random_weights": report["random_weights"],
        "detections": report["detections"],
        "top1_known": quality.get("top1_known"),
        "recommended_threshold": recommended,
        "recommendation_source": report["recommendation_source"],
        "trusted": report["recommendation_trusted"],
        "precision": at.get("precision"),
        "known_assigned": at.get("known_assigned"),
        "strangers_unassigned": at.get("strangers_unassigned"),
        "baks": at.get("baks"),
        "baus": at.get("baus"),
        "assigned_at_recommended": _rate_at(report, recommended),
        "assigned_at_current": _rate_at(report, report["current_threshold"]),
    }


def render_comparison(reports: list[dict[str, Any]]) -> str:
    """comparison.md: one column per model version."""
    rows = [summary_row(r) for r in reports]
    source = next(((r["decision_quality"] or {}).get("source") for r in reports if r["decision_quality"]), None)
    current = reports[0]["current_threshold"]
    head = "| | " + " | ".join(f"`{r['model_version']}`" for r in rows) + " |"
    lines = [
        "# Model versions side by side",
        "",
        f"Labelled data: {source or 'none (no decision-quality figures)'}. Current threshold {current:.2f}.",
        "",
        "![comparison](comparison.png)",
        "",
        head,
        "|---" * (len(rows) + 1) + "|",
    ]

    def line(label: str, key: str, fmt: Any = _pct) -> str:
        return f"| {label} | " + " | ".join(fmt(r[key]) for r in rows) + " |"

    lines += [
        line("random weights", "random_weights", lambda v: "YES (meaningless)" if v else "no"),
        line("detections scored", "detections", str),
        line("top-1 on known individuals", "top1_known"),
        line("recommended accept threshold", "recommended_threshold", lambda v: f"{v:.3f}"),
        line("recommendation trusted", "trusted", lambda v: "yes" if v else "NO"),
        line("precision at it", "precision"),
        line("known-individual detections assigned at it", "known_assigned"),
        line("strangers left unassigned at it", "strangers_unassigned"),
        line("BAKS at it", "baks"),
        line("BAUS at it", "baus"),
        line("all detections assigned at it", "assigned_at_recommended"),
        line(f"all detections assigned at the current {current:.2f}", "assigned_at_current"),
    ]
    lines += ["", "How each recommendation was made:", ""]
    lines += [f"- `{r['model_version']}`: {r['recommendation_source']}" for r in rows]
    return "\n".join(lines) + "\n"


def draw_comparison(reports: list[dict[str, Any]], path: Path) -> None:
    """Overlaid top-1 histograms (each normalised to its detections), assignment rates and precision curves."""
    fig, (hist, rates, precision) = plt.subplots(1, 3, figsize=(15, 4.6), dpi=100)
    for k, report in enumerate(reports):
        color = COLORS[k % len(COLORS)]
        label = report["model_version"] + (" (random)" if report["random_weights"] else "")
        edges, counts = report["histogram"]["edges"], report["histogram"]["counts"]
        total = max(1, sum(counts))
        hist.stairs([c / total for c in counts], edges, color=color, label=label, linewidth=1.5)
        hist.axvline(report["recommended_threshold"], color=color, linestyle="--", linewidth=1)
        xs = [t / 100 for t in range(0, 100)]
        rates.plot(xs, [_rate_at(report, x) or 0.0 for x in xs], color=color, label=label)
        curve = (report["decision_quality"] or {}).get("curve") or []
        points = [(p["threshold"], p["precision"]) for p in curve if p["precision"] is not None]
        if points:
            precision.plot(*zip(*points, strict=True), color=color, label=label)
    hist.set(title="top-1 similarity (share of detections)", xlabel="similarity", xlim=(-0.2, 1.0))
    rates.set(title="detections assigned", xlabel="accept threshold", ylabel="share", ylim=(0, 1.02))
    precision.set(title="assignment precision (labelled)", xlabel="accept threshold", ylim=(0, 1.02))
    hist.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
