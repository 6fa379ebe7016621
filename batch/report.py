"""The threshold analysis from the similarity log, computed with SQL aggregates (no score rows in memory).

Population: for one model version, the latest rank-1 row of each detection that is not a manual
assignment (manual detections sit in the gallery and match themselves). Labelled samples: manual
detections whose top-1 row was computed before the person decided (reviewed_at), i.e. a fair test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg

from batch.mixture import fit_mixture
from batch.quality import DEFAULT_PRECISION_TARGET, DEFAULT_STRANGER_TARGET, Query, evaluate
from serve_app.reid.decision import DEFAULT_ACCEPT_THRESHOLD
from serve_app.reid.model_spec import version_has_random_weights

RATE_THRESHOLDS = [round(0.30 + 0.05 * i, 2) for i in range(13)]  # 0.30 .. 0.90
F1_GRID = [round(0.01 * i, 2) for i in range(101)]
HIST_BINS = 400  # over [-1, 1]: 0.005 wide
REVIEW_PRECISION = 0.5
"""The review band starts where an automatic assignment would be right at least this often."""

_SCOPE = """
JOIN detections d ON d.id = s.detection_id
JOIN images i ON i.id = d.image_id
JOIN cameras c ON c.id = i.camera_id
WHERE s.model_version = %(mv)s AND s.rank = 1
  AND (%(sites)s::bigint[] IS NULL OR c.site_id = ANY(%(sites)s::bigint[]))
"""
TOP1_CTE = f"""
WITH top1 AS (
  SELECT DISTINCT ON (s.detection_id) s.detection_id, s.deer_id, s.similarity::float8 AS similarity
  FROM reid_similarity_scores s {_SCOPE} AND d.decision <> 'manual'
  ORDER BY s.detection_id, s.computed_at DESC, s.id DESC
)"""
LABELLED_CTE = f"""
WITH labelled AS (
  SELECT DISTINCT ON (s.detection_id) s.detection_id, s.deer_id, s.similarity::float8 AS similarity,
         d.deer_id AS true_deer
  FROM reid_similarity_scores s {_SCOPE}
    AND d.decision = 'manual' AND d.reviewed_at IS NOT NULL AND s.computed_at <= d.reviewed_at
  ORDER BY s.detection_id, s.computed_at DESC, s.id DESC
)"""
HISTOGRAM_SQL = (
    TOP1_CTE
    + f" SELECT width_bucket(similarity, -1.0, 1.0000001, {HIST_BINS}) AS bin, count(*) AS n FROM top1 GROUP BY 1"
)
RATES_SQL = (
    TOP1_CTE
    + """ SELECT t, count(top1.detection_id) FILTER (WHERE top1.similarity >= t) AS assigned,
       count(top1.detection_id) AS total
FROM unnest(%(ts)s::float8[]) AS t LEFT JOIN top1 ON true GROUP BY t ORDER BY t"""
)
LABELLED_SQL = (
    LABELLED_CTE
    + """ SELECT t, count(*) FILTER (WHERE similarity >= t) AS predicted,
       count(*) FILTER (WHERE similarity >= t AND deer_id = true_deer) AS correct, count(*) AS total
FROM unnest(%(ts)s::float8[]) AS t CROSS JOIN labelled GROUP BY t ORDER BY t"""
)
TRUTH_SQL = (
    TOP1_CTE
    + """ SELECT t,
       count(*) FILTER (WHERE similarity >= t) AS assigned,
       count(*) FILTER (WHERE similarity >= t AND top1.deer_id = g.deer_id) AS correct,
       count(*) FILTER (WHERE g.deer_id IS NOT NULL) AS profiled,
       count(*) FILTER (WHERE g.deer_id IS NULL) AS strangers,
       count(*) FILTER (WHERE g.deer_id IS NULL AND similarity < t) AS strangers_unassigned
FROM unnest(%(ts)s::float8[]) AS t CROSS JOIN top1 JOIN demo_ground_truth g ON g.detection_id = top1.detection_id
GROUP BY t ORDER BY t"""
)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


def _f1(p: float | None, r: float | None) -> float | None:
    return round(2 * p * r / (p + r), 6) if p and r else (0.0 if p is not None and r is not None else None)


def histogram(conn: psycopg.Connection[Any], args: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin edges, bin centers, counts) of top-1 similarities."""
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    counts = np.zeros(HIST_BINS, dtype=np.int64)
    for row in conn.execute(HISTOGRAM_SQL, args):
        counts[min(HIST_BINS, max(1, int(row["bin"]))) - 1] += int(row["n"])
    return edges, (edges[:-1] + edges[1:]) / 2, counts


def labelled_table(
    conn: psycopg.Connection[Any], args: dict[str, Any], thresholds: list[float]
) -> list[dict[str, Any]]:
    """Precision, recall and F1 against manual decisions, per threshold (empty without labels)."""
    out = []
    for row in conn.execute(LABELLED_SQL, {**args, "ts": thresholds}):
        p, r = _ratio(row["correct"], row["predicted"]), _ratio(row["correct"], row["total"])
        out.append({"threshold": round(row["t"], 2), "precision": p, "recall": r, "f1": _f1(p, r), "n": row["total"]})
    return out


# One row per scored detection with its truth: the generator's on demo data (strangers have no deer).
TRUTH_ROWS_SQL = (
    TOP1_CTE
    + """ SELECT top1.deer_id, top1.similarity, g.deer_id AS true_deer, g.individual
FROM top1 JOIN demo_ground_truth g ON g.detection_id = top1.detection_id"""
)
# Manual decisions taken after the score (a fair test; every one names a known deer).
LABELLED_ROWS_SQL = LABELLED_CTE + " SELECT deer_id, similarity, true_deer, NULL::int AS individual FROM labelled"


def decision_quality(
    conn: psycopg.Connection[Any],
    args: dict[str, Any],
    *,
    target: float = DEFAULT_PRECISION_TARGET,
    stranger_target: float = DEFAULT_STRANGER_TARGET,
) -> dict[str, Any] | None:
    """Top-1, BAKS/BAUS, precision and rates per threshold and the precision-target threshold, against the
    demo ground truth where there is one, else against manual decisions made after the score."""
    source, rows = "demo ground truth", conn.execute(TRUTH_ROWS_SQL, args).fetchall()
    if not rows:
        source, rows = "manual decisions made after the score", conn.execute(LABELLED_ROWS_SQL, args).fetchall()
    if not rows:
        return None
    queries = [
        Query(
            float(r["similarity"]),
            str(r["deer_id"]),
            None if r["true_deer"] is None else str(r["true_deer"]),
            None if r["true_deer"] is not None else f"individual {r['individual']}",
        )
        for r in rows
    ]
    result = evaluate(queries, target=target, stranger_target=stranger_target)
    review = next((p["threshold"] for p in result["curve"] if (p["precision"] or 0) >= REVIEW_PRECISION), None)
    return {"source": source, "review_threshold": review, **result}


def truth_table(conn: psycopg.Connection[Any], args: dict[str, Any], thresholds: list[float]) -> list[dict[str, Any]]:
    """Against the demo generator's ground truth: assignment precision/recall, strangers left unassigned."""
    out = []
    for row in conn.execute(TRUTH_SQL, {**args, "ts": thresholds}):
        out.append(
            {
                "threshold": round(row["t"], 4),
                "precision": _ratio(row["correct"], row["assigned"]),
                "recall": _ratio(row["correct"], row["profiled"]),
                "correct_unassigned_rate": _ratio(row["strangers_unassigned"], row["strangers"]),
                "n": row["profiled"] + row["strangers"],
            }
        )
    return out


def build_report(
    conn: psycopg.Connection[Any],
    *,
    model_version: str,
    sites: list[int] | None,
    current_threshold: float = DEFAULT_ACCEPT_THRESHOLD,
    precision_target: float = DEFAULT_PRECISION_TARGET,
    stranger_target: float = DEFAULT_STRANGER_TARGET,
) -> dict[str, Any]:
    """The whole report as a JSON-ready dict (histogram counts included, for the PNG). The recommended
    threshold is the lowest whose precision reaches the target (and that leaves the stranger target of
    labelled strangers unassigned) when enough labels exist, the mixture fit's otherwise."""
    args = {"mv": model_version, "sites": sites}
    edges, centers, counts = histogram(conn, args)
    total = int(counts.sum())
    fit = fit_mixture(centers, counts)
    quality = decision_quality(conn, args, target=precision_target, stranger_target=stranger_target)
    by_precision = quality["recommended"]["threshold"] if quality else None
    if quality is not None and by_precision is not None:
        recommended, source = float(by_precision), str(quality["recommended"]["reason"])
    else:
        recommended = fit.threshold if fit is not None and fit.threshold is not None else current_threshold
        source = "two-Gaussian mixture fit"
    rates = [
        {"threshold": round(r["t"], 2), "assigned": r["assigned"], "rate": _ratio(r["assigned"], r["total"])}
        for r in conn.execute(RATES_SQL, {**args, "ts": RATE_THRESHOLDS})
    ]
    labelled = labelled_table(conn, args, F1_GRID)
    best = max((r for r in labelled if r["f1"] is not None), key=lambda r: r["f1"], default=None)
    truth_thresholds = sorted({*RATE_THRESHOLDS, round(current_threshold, 4), round(recommended, 4)})
    truth = truth_table(conn, args, truth_thresholds)
    random_weights = version_has_random_weights(model_version)
    warnings = []
    if random_weights:
        warnings.append(
            f"Model {model_version} has RANDOM weights: its similarities carry no identity information, so the "
            "recommended threshold and every quality figure in this report are meaningless."
        )
    if fit is not None and not fit.trusted:
        warnings.append(f"The mixture fit is not trustworthy: {fit.reason}; keep the current threshold.")
    return {
        "model_version": model_version,
        "site_ids": sites,
        "random_weights": random_weights,
        "warnings": warnings,
        "detections": total,
        "current_threshold": current_threshold,
        "recommended_threshold": round(recommended, 4),
        "recommendation_source": source,
        "recommendation_trusted": (by_precision is not None or bool(fit and fit.trusted)) and not random_weights,
        "review_threshold": quality["review_threshold"] if quality else None,
        "decision_quality": quality,
        "mixture": fit.as_json() if fit else None,
        "assignment_rates": rates,
        "labelled": {
            "samples": labelled[0]["n"] if labelled else 0,
            "per_threshold": [r for r in labelled if r["threshold"] in RATE_THRESHOLDS],
            "f1_best": best,
        },
        "ground_truth": {
            "per_threshold": truth,
            "at_current": next((r for r in truth if r["threshold"] == round(current_threshold, 4)), None),
            "at_recommended": next((r for r in truth if r["threshold"] == round(recommended, 4)), None),
        }
        if truth
        else None,
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
    }
