"""A backfill on a head and two worker nodes: its work runs on both, and it survives losing one mid-run."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from serve_app.store.db import connect
from tests.batch import conftest as batch_fixtures
from tests.batch.conftest import Demo
from tests.batch.test_backfill import expected_rows
from tests.fixtures.multinode import LocalRayCluster, Node
from tests.helpers import score_duplicates
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
# The batch tests' demo data set (72 images) and its score reset, as fixtures of this module too.
demo_root, demo, fresh = batch_fixtures.demo_root, batch_fixtures.demo, batch_fixtures.fresh

WORKER_CPUS = 3
"""Per worker node: one embedding actor (1 CPU) and room for read, decode and write tasks; after losing a
node, the other has room for both actors (the lost one is started again when the pool still needs it) and
still has a CPU for the tasks (the head has none)."""
RUN_S = 240
EMBED = "EmbedAndMatch"
READ_DECODE = "read_and_decode"


def backfill_args(demo: Demo, *extra: str) -> list[str]:
    """A small, quick run of the CLI with two embedding actors, one torch thread each."""
    return [
        sys.executable, "-m", "batch.backfill", "--mode", "all", "--model", "resnet18", "--input-size-px", "64",
        "--batch-size", "8", "--rows-per-block", "1", "--actors", "2", "--cpu-threads", "1",
        "--database-url", demo.dsn, "--image-root", str(demo.image_root), *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def backfill_driver(cluster: LocalRayCluster, demo: Demo, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``backfill_args`` run as a driver on the cluster's head, its output in ``log``; killed on the way out if it
    still runs (a test that failed half-way)."""
    with log.open("w") as out:
        driver = subprocess.Popen(backfill_args(demo), env=cluster.driver_env(), cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def two_workers(cluster: LocalRayCluster) -> tuple[Node, Node]:
    """Two worker nodes of the same size."""
    return cluster.add_node(num_cpus=WORKER_CPUS), cluster.add_node(num_cpus=WORKER_CPUS)


def embed_actors(cluster: LocalRayCluster) -> list[dict[str, Any]]:
    """The backfill's embedding actors (Ray Data names them after the class they run)."""
    return [a for a in cluster.actors() if EMBED in (a.get("repr_name") or "") + (a.get("class_name") or "")]


def read_decode_tasks(cluster: LocalRayCluster) -> list[dict[str, Any]]:
    """The backfill's read-and-decode task attempts, whatever their state."""
    return [t for t in cluster.tasks() if READ_DECODE in t["name"]]


def run_row(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The one backfill run of the test."""
    rows = conn.execute("SELECT * FROM backfill_runs").fetchall()
    assert len(rows) == 1, rows
    return dict(rows[0])


def hold_the_run_after_a_block(gate: psycopg.Connection[Any], driver: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Lock the run's row once a block is written, and keep it: every later block writes its scores but then
    waits for the row (a block commits its rows and counters in one transaction), so the run stays mid-way."""

    def first_block() -> dict[str, Any] | None:
        assert driver.poll() is None, "the driver ended before the first block was written"
        run = gate.execute("SELECT id, done, total FROM backfill_runs FOR UPDATE").fetchone()
        if run and run["done"] > 0:
            return dict(run)
        gate.rollback()
        return None

    return wait_until(first_block, what="the first block's score rows", timeout_s=RUN_S, every_s=0.01)


@pytest.mark.slow
def test_a_backfill_runs_on_both_worker_nodes_and_losing_one_mid_run_completes_with_every_row_once(
    local_ray_cluster: LocalRayCluster, demo: Demo, fresh: psycopg.Connection[Any], tmp_path: Path
) -> None:
    cluster = local_ray_cluster
    workers = two_workers(cluster)
    log = tmp_path / "driver.log"
    with backfill_driver(cluster, demo, log) as driver:
        with connect(demo.dsn) as gate:
            run = hold_the_run_after_a_block(gate, driver)
            assert 0 < run["done"] < run["total"]
            # The work runs on both worker nodes and none on the head (Ray Data spreads its tasks and actors).
            nodes = {n.node_id for n in workers}
            assert {x["node_id"] for x in embed_actors(cluster)} == nodes
            wait_until(
                lambda: {t["node_id"] for t in read_decode_tasks(cluster) if t["node_id"]} == nodes,
                what="read/decode tasks placed on both worker nodes and none elsewhere",
            )
            # Lose the node where a write task waits in its transaction: its scores are written, not committed.
            writing = wait_until(
                lambda: [t for t in cluster.tasks() if t["name"] == "Write" and t["state"] == "RUNNING"],
                what="a write task waiting for the run's row",
            )
            lost = next(n for n in workers if n.node_id == writing[0]["node_id"])
            survivor = next(n for n in workers if n is not lost)
            lost_actors = [x["actor_id"] for x in embed_actors(cluster) if x["node_id"] == lost.node_id]
            assert lost_actors, "no embedding actor on the node to lose"
            cluster.kill_node(lost)
            gate.rollback()
        rc = driver.wait(timeout=RUN_S)
    output = log.read_text()
    assert rc == 0 and f"run {run['id']}: completed" in output, output[-4000:]

    # Every score row once: exactly detections x profiles, none twice, no detection without its rows.
    row = run_row(fresh)
    assert (row["state"], row["done"], row["failed"]) == ("completed", row["total"], 0)
    assert row["score_rows"] == expected_rows(fresh)
    n = fresh.execute("SELECT count(*) AS n FROM reid_similarity_scores WHERE run_id = %s", (row["id"],))
    assert n.fetchone()["n"] == expected_rows(fresh)
    assert score_duplicates(fresh) == 0
    gaps = fresh.execute(
        "SELECT count(*) AS n FROM detections d WHERE NOT EXISTS"
        " (SELECT 1 FROM reid_similarity_scores s WHERE s.detection_id = d.id AND s.run_id = %s)",
        (row["id"],),
    ).fetchone()["n"]
    assert gaps == 0

    # How: Ray retried the lost node's task attempts on the survivor, the write in its transaction included.
    def retried() -> list[dict[str, Any]]:
        attempts = cluster.tasks()
        # Failed with the node: the GCS records NODE_DIED, or WORKER_DIED when the owner hears of the worker's end
        # first (the raylet's workers exit as soon as it is killed, before the GCS calls the node dead).
        died = {t["task_id"] for t in attempts if t["node_id"] == lost.node_id and t["state"] == "FAILED"}
        return [t for t in attempts if t["task_id"] in died and t["node_id"] == survivor.node_id
                and t["state"] == "FINISHED"]  # fmt: skip

    # The state API hears of each attempt's end from the workers' periodic task events, so the write's retry may
    # be listed after the read and decode retries: wait for it, not only for the first retry listed.
    def write_retried() -> list[dict[str, Any]]:
        again = retried()
        return again if any(t["name"] == "Write" and t["attempt_number"] > 0 for t in again) else []

    wait_until(write_retried, what="the write lost with the node retried and finished on the other one")
    # The lost embedding actor is restarted (max_restarts=-1) when the pool still needs it; a run whose other actor
    # finishes the work first ends the pool before that, so its restarts are printed, not asserted.
    restarts = {x["actor_id"]: x["num_restarts"] for x in embed_actors(cluster)}
    print(f"lost embedding actors' restarts: {[restarts.get(actor) for actor in lost_actors]}")
