"""Threshold analysis: files, rates equal to SQL counts, the picture, warnings, ground truth, the HTTP route."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from PIL import Image

from batch.analyze import CURRENT_COLOR, RECOMMENDED_COLOR, analyze, main
from batch.compare import COLORS
from serve_app.reid.scores import copy_scores, score_rows
from tests import factories
from tests.batch.conftest import Demo

TRAINED = "resnet50-0123456789ab-224"


def log_bimodal_scores(
    conn: psycopg.Connection[Any], model_version: str, *, seed: int = 3, hit_rate: float = 0.8
) -> None:
    """Online-style score rows: profiled individuals score high on their own deer (``hit_rate`` of them),
    strangers low."""
    rng = np.random.default_rng(seed)
    dets = conn.execute(
        "SELECT d.id, c.site_id, d.decision, d.deer_id, g.deer_id AS truth FROM detections d"
        " JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id"
        " JOIN demo_ground_truth g ON g.detection_id = d.id ORDER BY d.id"
    ).fetchall()
    profiles: dict[int, list[int]] = {}
    for r in conn.execute("SELECT id, site_id FROM deer ORDER BY id"):
        profiles.setdefault(r["site_id"], []).append(r["id"])
    rows = []
    when = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for det in dets:
        deer = profiles[det["site_id"]]
        sims = rng.normal(0.25, 0.05, len(deer))
        if det["truth"] is not None and rng.random() < hit_rate:
            sims[deer.index(det["truth"])] = rng.normal(0.8, 0.05)
        rows += score_rows(det["id"], deer_ids=deer, similarities=np.clip(sims, -1, 1), threshold=0.55,
                           assigned_deer_id=None, model_version=model_version)  # fmt: skip
    rows = [type(r)(**{**{f: getattr(r, f) for f in r.__slots__}, "computed_at": when}) for r in rows]
    copy_scores(conn, rows)
    # Manual decisions taken after those scores: labelled samples.
    conn.execute("UPDATE detections SET reviewed_at = %s WHERE decision = 'manual'", (when + dt.timedelta(days=1),))


def sql_rate(conn: psycopg.Connection[Any], model_version: str, t: float) -> tuple[int, int]:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE similarity >= %s) AS a, count(*) AS n FROM reid_similarity_scores s"
        " JOIN detections d ON d.id = s.detection_id WHERE s.rank = 1 AND s.model_version = %s"
        " AND d.decision <> 'manual'",
        (t, model_version),
    ).fetchone()
    return int(row["a"]), int(row["n"])


def color_pixels(path: Path, hex_color: str) -> int:
    target = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    return int((np.abs(pixels - target).sum(axis=1) < 30).sum())


def test_analyze_writes_three_files_with_rates_equal_to_sql_and_both_lines(
    demo: Demo, fresh: psycopg.Connection[Any], tmp_path: Path
) -> None:
    log_bimodal_scores(fresh, TRAINED)
    report = analyze(demo.dsn, model_version=TRAINED, out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["histogram.png", "report.json", "report.md"]
    assert json.loads((tmp_path / "report.json").read_text())["model_version"] == TRAINED
    assert [r["threshold"] for r in report["assignment_rates"]] == [round(0.3 + 0.05 * i, 2) for i in range(13)]
    for rate in report["assignment_rates"]:
        assigned, total = sql_rate(fresh, TRAINED, rate["threshold"])
        assert rate["assigned"] == assigned and rate["rate"] == pytest.approx(assigned / total, abs=1e-6)
    assert report["recommendation_trusted"] and 0.3 <= report["recommended_threshold"] < 0.7
    assert not report["random_weights"] and report["warnings"] == []
    # Bars, the current threshold line (red) and the recommended one (green) are all drawn.
    png = tmp_path / "histogram.png"
    assert color_pixels(png, "#4c72b0") > 500
    assert color_pixels(png, CURRENT_COLOR) > 200 and color_pixels(png, RECOMMENDED_COLOR) > 200
    truth = report["ground_truth"]["at_recommended"]
    assert truth["precision"] > 0.9 and truth["correct_unassigned_rate"] > 0.9
    # Decision quality against the generator's truth: the recommendation is the precision-target threshold.
    quality = report["decision_quality"]
    assert quality["source"] == "demo ground truth" and 0.75 < quality["top1_known"] < 0.9
    assert report["recommended_threshold"] == quality["recommended"]["threshold"]
    assert report["recommendation_source"] == (
        "lowest threshold with precision >= 0.95 and >= 90% of strangers left unassigned"
    )
    at = quality["at_recommended"]
    assert at["precision"] >= 0.95 and at["strangers_unassigned"] > 0.95 and 0.7 < at["known_assigned"] < 0.9
    assert 0 < at["baus"] <= 1 and 0 < at["baks"] <= at["known_assigned"]
    lower = [p for p in quality["curve"] if p["threshold"] < report["recommended_threshold"]]
    assert all((p["precision"] or 0) < 0.95 for p in lower)
    assert report["review_threshold"] is not None and report["review_threshold"] <= report["recommended_threshold"]
    best = report["labelled"]["f1_best"]
    assert report["labelled"]["samples"] > 0 and best["f1"] > 0.5
    text = (tmp_path / "report.md").read_text()
    assert "Assignment rate per threshold" in text and "F1-best threshold" in text and "ground truth" in text
    assert "Decision quality (against demo ground truth)" in text and "BAUS" in text


def test_compare_puts_two_model_versions_side_by_side_with_each_reports_figures(
    demo: Demo, fresh: psycopg.Connection[Any], tmp_path: Path
) -> None:
    worse = "resnet50-fedcba987654-224"
    log_bimodal_scores(fresh, TRAINED)
    log_bimodal_scores(fresh, worse, seed=4, hit_rate=0.4)
    argv = ["--model-version", TRAINED, "--compare", worse, "--out", str(tmp_path), "--no-store"]
    assert main([*argv, "--database-url", demo.dsn]) == 0
    first = json.loads((tmp_path / "report.json").read_text())
    second = json.loads((tmp_path / "compare-1" / "report.json").read_text())
    assert (first["model_version"], second["model_version"]) == (TRAINED, worse)
    text = (tmp_path / "comparison.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| |"))
    assert header == f"| | `{TRAINED}` | `{worse}` |"
    top1 = next(line for line in text.splitlines() if line.startswith("| top-1 on known individuals"))
    cells = [c.strip() for c in top1.strip("|").split("|")][1:]
    expected = [f"{100 * r['decision_quality']['top1_known']:.1f}%" for r in (first, second)]
    assert cells == expected and first["decision_quality"]["top1_known"] > second["decision_quality"]["top1_known"]
    threshold = next(line for line in text.splitlines() if line.startswith("| recommended accept threshold"))
    assert all(f"{r['recommended_threshold']:.3f}" in threshold for r in (first, second))
    png = tmp_path / "comparison.png"
    assert color_pixels(png, COLORS[0]) > 300 and color_pixels(png, COLORS[1]) > 300


def test_random_weights_and_unimodal_scores_are_called_meaningless(
    demo: Demo, fresh: psycopg.Connection[Any], tmp_path: Path
) -> None:
    version = "resnet18-random-seed7-64"
    rows = []
    rng = np.random.default_rng(5)
    for det in fresh.execute("SELECT id FROM detections WHERE decision <> 'manual'").fetchall():
        rows += score_rows(det["id"], deer_ids=[1], similarities=np.array([rng.normal(0.9, 0.02)]), threshold=0.55,
                           assigned_deer_id=None, model_version=version)  # fmt: skip
    fresh.execute("INSERT INTO deer (id, site_id, name) SELECT 1, min(id), 'x' FROM sites ON CONFLICT DO NOTHING")
    copy_scores(fresh, rows)
    report = analyze(demo.dsn, model_version=version, out=tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert report["random_weights"] and "RANDOM weights" in text and "meaningless" in text
    assert not report["recommendation_trusted"] and "Trust it: NO" in text
    assert color_pixels(tmp_path / "histogram.png", CURRENT_COLOR) > 200


def test_latest_resolves_to_the_newest_logged_model_version(
    demo: Demo, fresh: psycopg.Connection[Any], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="no similarity scores"):
        analyze(demo.dsn, model_version="latest", out=tmp_path / "none")
    log_bimodal_scores(fresh, TRAINED)
    report = analyze(demo.dsn, model_version="latest", out=tmp_path / "latest", store=False)
    assert report["model_version"] == TRAINED


@pytest.mark.slow
def test_threshold_report_route_serves_the_latest_report_for_the_keys_sites(
    demo: Demo, fresh: psycopg.Connection[Any], serve_url: str, tmp_path: Path
) -> None:
    log_bimodal_scores(fresh, TRAINED)
    sites = [r["id"] for r in fresh.execute("SELECT id FROM sites ORDER BY id")]
    analyze(demo.dsn, model_version=TRAINED, out=tmp_path / "all")
    analyze(demo.dsn, model_version=TRAINED, out=tmp_path / "one", sites=[sites[0]])
    all_key = factories.api_key(fresh)
    one_key = factories.api_key(fresh, sites=[sites[0]])
    other_key = factories.api_key(fresh, sites=[sites[1]])
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        everything = client.get("/api/reid/threshold-report", headers={"Authorization": f"Bearer {all_key}"})
        assert everything.status_code == 200 and everything.json()["site_ids"] is None
        mine = client.get(f"/api/reid/threshold-report?model_version={TRAINED}",
                          headers={"Authorization": f"Bearer {one_key}"})  # fmt: skip
        assert mine.status_code == 200 and mine.json()["site_ids"] == [sites[0]]
        assert mine.json()["assignment_rates"][0]["threshold"] == 0.3
        hidden = client.get("/api/reid/threshold-report", headers={"Authorization": f"Bearer {other_key}"})
        assert hidden.status_code == 404 and hidden.headers["content-type"].startswith("application/problem+json")
        assert client.get("/api/reid/threshold-report").status_code == 401
