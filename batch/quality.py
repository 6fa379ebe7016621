"""Decision quality of a re-ID model against labelled data: top-1, BAKS/BAUS, precision and rates per threshold.

Torch-free (numpy): training validation and the analysis report both use it. Inputs are, per query, the
best similarity to any gallery individual, that individual, and the query's true individual (None for a
stranger: an individual with no gallery, which the matcher should leave unassigned).

- top-1 on known individuals: the best gallery individual is the right one.
- at a threshold t a query is *assigned* when its best similarity is >= t; an assignment is correct when it
  names the true individual (a stranger's assignment is always wrong).
- precision: correct assignments / assignments; known assigned: share of known queries assigned (rightly
  or not); strangers unassigned: share of stranger queries left unassigned.
- BAKS / BAUS (as AnimalCLEF scores re-ID): accuracy per individual averaged over individuals, on known
  individuals (correct assignment) and on unknown ones (left unassigned).
- recommended accept threshold: the lowest threshold whose precision reaches the target and, when the
  labelled queries include strangers, that leaves at least the stranger target of them unassigned, when
  enough labelled queries exist; None otherwise (the caller falls back to the mixture fit). Strangers are
  a small share of trail-camera detections, so precision alone barely sees them: without the second
  condition a threshold that assigns most new individuals to someone else could still reach 95% precision.
  Manual decisions always name a known individual; against them only precision applies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_PRECISION_TARGET = 0.95
DEFAULT_STRANGER_TARGET = 0.90
"""Share of strangers' detections the recommended threshold must leave unassigned (when strangers are labelled)."""
MIN_LABELLED = 50
"""Fewest labelled queries (known and strangers together) a threshold recommendation rests on."""
THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.05, 1.0, 0.01))


@dataclass(frozen=True)
class Query:
    """One labelled query: its best gallery match and its truth (``truth`` None: a stranger)."""

    best_similarity: float
    best_individual: str | None
    truth: str | None
    stranger: str | None = None
    """A stranger's own identity (groups its queries for BAUS); None for known individuals or when unknown."""


def best_matches(
    query_vectors: np.ndarray, gallery_vectors: np.ndarray, gallery_labels: Sequence[str]
) -> list[tuple[float, str | None]]:
    """Per query, the best cosine similarity to a gallery individual (max over its vectors) and that individual."""
    if len(gallery_labels) == 0:
        return [(0.0, None)] * len(query_vectors)
    sims = query_vectors @ gallery_vectors.T
    best = sims.argmax(axis=1)
    return [(float(sims[i, j]), gallery_labels[j]) for i, j in enumerate(best)]


def _balanced(hits: dict[str, list[bool]]) -> float | None:
    if not hits:
        return None
    return float(np.mean([np.mean(v) for v in hits.values()]))


def at_threshold(queries: Sequence[Query], threshold: float) -> dict[str, Any]:
    """Precision, rates and BAKS/BAUS at one threshold."""
    assigned = [q for q in queries if q.best_similarity >= threshold]
    correct = [q for q in assigned if q.truth is not None and q.best_individual == q.truth]
    known = [q for q in queries if q.truth is not None]
    strangers = [q for q in queries if q.truth is None]
    per_known: dict[str, list[bool]] = defaultdict(list)
    for q in known:
        per_known[str(q.truth)].append(q.best_similarity >= threshold and q.best_individual == q.truth)
    per_stranger: dict[str, list[bool]] = defaultdict(list)
    for k, q in enumerate(strangers):
        per_stranger[q.stranger if q.stranger is not None else f"query{k}"].append(q.best_similarity < threshold)
    return {
        "threshold": threshold,
        "assigned": len(assigned),
        "precision": len(correct) / len(assigned) if assigned else None,
        "known_assigned": sum(q.best_similarity >= threshold for q in known) / len(known) if known else None,
        "known_correct": len(correct) / len(known) if known else None,
        "strangers_unassigned": sum(q.best_similarity < threshold for q in strangers) / len(strangers)
        if strangers
        else None,
        "baks": _balanced(per_known),
        "baus": _balanced(per_stranger),
    }


def recommend(
    curve: Sequence[dict[str, Any]],
    *,
    target: float,
    labelled: int,
    min_labelled: int = MIN_LABELLED,
    stranger_target: float = DEFAULT_STRANGER_TARGET,
) -> dict[str, Any]:
    """The lowest threshold whose precision reaches ``target`` (and that leaves ``stranger_target`` of the
    strangers unassigned, where strangers are labelled), or why there is none."""
    if labelled < min_labelled:
        return {"threshold": None, "reason": f"{labelled} labelled queries, fewer than {min_labelled}"}
    strangers = any(point.get("strangers_unassigned") is not None for point in curve)
    rule = f"lowest threshold with precision >= {target}" + (
        f" and >= {stranger_target:.0%} of strangers left unassigned" if strangers else ""
    )
    for point in curve:
        if point["precision"] is None or point["precision"] < target or point["assigned"] == 0:
            continue
        if strangers and (point.get("strangers_unassigned") or 0.0) < stranger_target:
            continue
        return {"threshold": point["threshold"], "reason": rule}
    return {"threshold": None, "reason": f"no threshold meets the rule ({rule})"}


def evaluate(
    queries: Sequence[Query],
    *,
    target: float = DEFAULT_PRECISION_TARGET,
    thresholds: Sequence[float] = THRESHOLDS,
    min_labelled: int = MIN_LABELLED,
    stranger_target: float = DEFAULT_STRANGER_TARGET,
) -> dict[str, Any]:
    """Top-1, the per-threshold curve, the recommended threshold and the figures at it."""
    known = [q for q in queries if q.truth is not None]
    curve = [at_threshold(queries, t) for t in thresholds]
    recommendation = recommend(
        curve, target=target, labelled=len(queries), min_labelled=min_labelled, stranger_target=stranger_target
    )
    at = at_threshold(queries, recommendation["threshold"]) if recommendation["threshold"] is not None else None
    return {
        "known_queries": len(known),
        "stranger_queries": len(queries) - len(known),
        "top1_known": sum(q.best_individual == q.truth for q in known) / len(known) if known else None,
        "precision_target": target,
        "stranger_target": stranger_target if len(queries) > len(known) else None,
        "recommended": recommendation,
        "at_recommended": at,
        "curve": curve,
    }
