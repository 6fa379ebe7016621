"""Kill a running backfill with SIGKILL mid-run, resume it: no duplicate and no missing score rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import ray

from batch.backfill import run_backfill
from serve_app.store.db import connect
from tests.batch.conftest import Demo
from tests.batch.test_backfill import duplicates, expected_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_killed_run_resumes_without_duplicates_or_gaps(demo: Demo, fresh: psycopg.Connection[Any]) -> None:
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,  # the job joins this cluster, as under `ray job submit`
        "TRAILCAM_DATABASE_URL": demo.dsn,
        "TRAILCAM_IMAGE_ROOT": str(demo.image_root),
        "PYTHONPATH": str(ROOT),
    }
    # A slower model and small blocks, so the run is caught with some blocks written and some not.
    args = ["--mode", "all", "--model", "resnet50", "--input-size-px", "96", "--batch-size", "4",
            "--rows-per-block", "4"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch.backfill", *args], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # The counters are read under the run row's lock. A block commits its scores and its counters in one
    # transaction, so once a block is seen done, holding the lock freezes the run there until the kill,
    # however fast the blocks come (a dozen can commit within a few milliseconds).
    run: dict[str, Any] | None = None
    deadline = time.monotonic() + 240
    with connect(demo.dsn) as gate:
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                run = gate.execute("SELECT id, done, total FROM backfill_runs FOR UPDATE").fetchone()
                if run and run["done"] > 0:
                    break
                gate.rollback()
                time.sleep(0.001)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            time.sleep(2)  # the dead driver's workers are torn down while their last block waits for the lock
            gate.rollback()
    assert run is not None and 0 < run["done"] < run["total"], f"not caught mid-run: {run}"
    run_id = uuid.UUID(str(run["id"]))
    killed = fresh.execute("SELECT state, done FROM backfill_runs WHERE id = %s", (run_id,)).fetchone()
    assert killed["state"] == "running"  # SIGKILL leaves no chance to record anything
    partial = fresh.execute("SELECT count(*) AS n FROM reid_similarity_scores").fetchone()["n"]
    assert 0 < partial < expected_rows(fresh)

    # A worker still alive after the kill could commit a waiting block now: it would conflict, not duplicate.
    result = run_backfill(None, settings=demo.settings, resume=run_id)
    assert result.state == "completed" and result.run_id == run_id
    assert result.total < run["total"]  # only what was left
    assert duplicates(fresh) == 0
    total_rows = fresh.execute("SELECT count(*) AS n FROM reid_similarity_scores WHERE run_id = %s", (run_id,))
    assert total_rows.fetchone()["n"] == expected_rows(fresh)
    gaps = fresh.execute(
        "SELECT count(*) AS n FROM detections d WHERE NOT EXISTS (SELECT 1 FROM reid_similarity_scores s"
        " WHERE s.detection_id = d.id AND s.run_id = %s)",
        (run_id,),
    ).fetchone()["n"]
    assert gaps == 0
    final = fresh.execute("SELECT state, done, total, score_rows FROM backfill_runs WHERE id = %s", (run_id,))
    row = final.fetchone()
    assert row["state"] == "completed" and row["done"] == row["total"] and row["score_rows"] == expected_rows(fresh)
