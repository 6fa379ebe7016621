"""Decision quality figures: top-1, precision and rates per threshold, BAKS/BAUS and the recommendation."""

from __future__ import annotations

import numpy as np
import pytest

from batch.quality import Query, at_threshold, best_matches, evaluate
from batch.train_data import Sample, split


def test_figures_at_a_threshold_count_strangers_as_wrong_assignments() -> None:
    queries = [
        Query(0.9, "a", "a"),  # right, assigned at 0.5
        Query(0.8, "b", "a"),  # wrong individual, assigned
        Query(0.4, "a", "a"),  # right but below 0.5: unassigned
        Query(0.7, "b", None, "s1"),  # stranger assigned: wrong
        Query(0.3, "a", None, "s1"),  # stranger left unassigned
        Query(0.2, "a", None, "s2"),  # another stranger, its one query left unassigned
    ]
    point = at_threshold(queries, 0.5)
    assert point["assigned"] == 3
    assert point["precision"] == pytest.approx(1 / 3)
    assert point["known_assigned"] == pytest.approx(2 / 3)
    assert point["strangers_unassigned"] == pytest.approx(2 / 3)
    assert point["baks"] == pytest.approx(1 / 3)  # one individual, one of three right
    assert point["baus"] == pytest.approx((1 / 2 + 1) / 2)  # balanced over the two strangers


def test_recommendation_is_the_lowest_threshold_reaching_the_target() -> None:
    rng = np.random.default_rng(0)
    right = [Query(float(s), "x", "x") for s in rng.uniform(0.6, 1.0, 80)]
    strangers = [Query(float(s), "x", None) for s in rng.uniform(0.0, 0.55, 40)]
    result = evaluate(right + strangers, target=0.95)
    assert result["top1_known"] == 1.0
    threshold = result["recommended"]["threshold"]
    assert threshold is not None and 0.5 <= threshold <= 0.6
    assert result["at_recommended"]["precision"] >= 0.95
    below = [p for p in result["curve"] if p["threshold"] < threshold]
    assert all(p["precision"] < 0.95 for p in below if p["precision"] is not None)


def test_no_recommendation_with_too_few_labels_or_when_no_threshold_reaches_the_target() -> None:
    few = evaluate([Query(0.9, "a", "a")] * 10, min_labelled=50)
    assert few["recommended"]["threshold"] is None and "fewer than 50" in few["recommended"]["reason"]
    hopeless = evaluate([Query(0.9, "b", "a")] * 60, target=0.95)
    assert hopeless["recommended"]["threshold"] is None
    assert "no threshold meets the rule" in hopeless["recommended"]["reason"]


def test_recommendation_leaves_the_stranger_target_unassigned_when_strangers_are_labelled() -> None:
    # Strangers are few, so precision reaches 95% at 0.5 while most of them are still assigned to someone.
    right = [Query(0.5 + 0.005 * k, "x", "x") for k in range(100)]
    strangers = [Query(0.5 + 0.02 * k, "x", None, f"s{k}") for k in range(10)]  # 0.50 .. 0.68
    by_precision = evaluate(right + strangers, target=0.90, stranger_target=0.0)
    assert by_precision["at_recommended"]["strangers_unassigned"] == 0.0  # every stranger assigned to "x"
    result = evaluate(right + strangers, target=0.90, stranger_target=0.90)
    threshold = result["recommended"]["threshold"]
    assert threshold is not None and threshold > 0.66
    assert result["at_recommended"]["strangers_unassigned"] >= 0.90
    assert "strangers left unassigned" in result["recommended"]["reason"]
    without_strangers = evaluate(right, target=0.90)
    assert without_strangers["recommended"]["threshold"] == by_precision["recommended"]["threshold"]
    assert "strangers" not in without_strangers["recommended"]["reason"]


def test_best_matches_take_the_closest_gallery_vector() -> None:
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    queries = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    assert best_matches(queries, gallery, ["a", "b"]) == [(pytest.approx(0.8), "b"), (pytest.approx(1.0), "a")]


def test_split_holds_out_whole_individuals_and_gives_known_ones_a_gallery() -> None:
    samples = [Sample(f"{i}-{k}.jpg", f"deer{i}", "demo") for i in range(20) for k in range(6)]
    parts = split(samples, seed=3, val_fraction=0.25)
    individual = [s.individual for s in samples]
    train = {individual[i] for i in parts.train}
    gallery = {individual[i] for i in parts.gallery}
    known = {individual[i] for i in parts.known_queries}
    strangers = {individual[i] for i in parts.stranger_queries}
    assert len(train) == 15 and not train & (gallery | strangers)
    assert known == gallery and not gallery & strangers
    assert len(strangers) + len(known) == 5
    assert all(sum(individual[i] == name for i in parts.gallery) == 3 for name in gallery)
    assert split(samples, seed=3, val_fraction=0.25) == parts
