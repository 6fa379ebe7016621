"""Kill a running backfill with SIGKILL mid-run, resume it: no duplicate and no missing score rows."""

from __future__ import annotations

import os
import shutil
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

from batch import runs
from batch.backfill import main, run_backfill
from batch.runs import RunLocked
from serve_app.config import Settings
from serve_app.store.db import connect
from tests.batch.conftest import Demo, small_options
from tests.batch.test_backfill import expected_rows
from tests.helpers import score_duplicates

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 120


def wait_until_unlocked(dsn: str, run_id: uuid.UUID) -> None:
    """Wait until no driver holds the run's lock (a killed driver's session ends a moment after it)."""
    deadline = time.monotonic() + WAIT_S
    with connect(dsn, autocommit=True) as probe:
        while not runs.try_lock_run(probe, run_id):
            assert time.monotonic() < deadline, f"run {run_id} still locked after {WAIT_S} s"
            time.sleep(0.05)


def end_sessions_waiting_for(conn: psycopg.Connection[Any]) -> None:
    """End the sessions blocked by ``conn``'s locks (a killed driver's last blocks) and wait until they are gone."""
    deadline = time.monotonic() + WAIT_S
    pid = conn.info.backend_pid
    sql = "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
    with connect(conn.info.dsn, autocommit=True) as admin:
        while waiting := [r["pid"] for r in admin.execute(sql, (pid,))]:
            assert time.monotonic() < deadline, f"sessions {waiting} still wait for the gate"
            admin.execute("SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) AS p", (waiting,))
            time.sleep(0.05)


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
            # The dead driver's blocks that wait for the gate would land whenever its workers die: end them
            # now, so what the run holds is what it had when it was killed.
            end_sessions_waiting_for(gate)
            gate.rollback()
    assert run is not None and 0 < run["done"] < run["total"], f"not caught mid-run: {run}"
    run_id = uuid.UUID(str(run["id"]))
    killed = fresh.execute("SELECT state, done FROM backfill_runs WHERE id = %s", (run_id,)).fetchone()
    assert killed["state"] == "running"  # SIGKILL leaves no chance to record anything
    partial = fresh.execute("SELECT count(*) AS n FROM reid_similarity_scores").fetchone()["n"]
    assert 0 < partial < expected_rows(fresh)

    wait_until_unlocked(demo.dsn, run_id)
    result = run_backfill(None, settings=demo.settings, resume=run_id)
    assert result.state == "completed" and result.run_id == run_id
    assert result.total < run["total"]  # only what was left
    assert score_duplicates(fresh) == 0
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


@pytest.mark.usefixtures("ray_session", "keep_sigterm")
def test_a_second_resume_of_a_run_another_driver_holds_is_refused_and_nothing_is_counted_twice(
    demo: Demo, fresh: psycopg.Connection[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Some images are gone, so the run has failed detections that a resume reads again.
    root = tmp_path / "images"
    shutil.copytree(demo.image_root, root)
    gone = [r["uri"] for r in fresh.execute(
        "SELECT i.uri FROM images i JOIN detections d ON d.image_id = i.id WHERE d.decision <> 'manual'"
        " ORDER BY d.id DESC LIMIT 3"
    )]  # fmt: skip
    for uri in gone:
        (root / uri).unlink()
    settings = Settings(environment="test", database_url=demo.dsn, image_root=root)
    first = run_backfill(small_options(mode="all", rows_per_block=16), settings=settings)
    assert first.state == "completed" and first.failed == len(gone) and first.run_id is not None
    run_id = first.run_id
    # Another driver is resuming the run: it holds the run's lock, as a driver does while it works.
    fresh.execute("UPDATE backfill_runs SET state = 'running', finished_at = NULL WHERE id = %s", (run_id,))
    before = fresh.execute("SELECT * FROM backfill_runs WHERE id = %s", (run_id,)).fetchone()
    with connect(demo.dsn) as other:
        assert runs.try_lock_run(other, run_id)
        with pytest.raises(RunLocked, match="being resumed by another driver"):
            run_backfill(None, settings=settings, resume=run_id)
        rc = main(["--resume", str(run_id), "--database-url", demo.dsn, "--image-root", str(root)])
        assert rc != 0 and "being resumed by another driver" in capsys.readouterr().err
        assert fresh.execute("SELECT * FROM backfill_runs WHERE id = %s", (run_id,)).fetchone() == before

    # Once the other driver is gone, the resume reads the failed detections again and counts them once.
    wait_until_unlocked(demo.dsn, run_id)
    again = run_backfill(None, settings=settings, resume=run_id)
    assert again.state == "completed" and (again.total, again.failed) == (len(gone), len(gone))
    row = fresh.execute("SELECT state, done, failed, total FROM backfill_runs WHERE id = %s", (run_id,)).fetchone()
    assert (row["state"], row["done"], row["failed"]) == ("completed", row["total"] - len(gone), len(gone))
