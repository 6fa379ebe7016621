"""Fine-tuning data-parallel on a head and two worker nodes: one Ray Train worker on each, and a run that loses
a worker's node restarts its worker group from the last checkpoint and completes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from batch.models import read_card
from tests.batch import test_train
from tests.fixtures.multinode import LocalRayCluster, Node
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
# The training tests' tiny training set (8 synthetic individuals), as a fixture of this module too.
tiny_set = test_train.tiny_set

WORKER_CPUS = 2
"""Per worker node: one training worker (1 CPU) under SPREAD, and room for both after the other node is lost,
so the restarted worker group fits on the survivor (SPREAD is soft). With one CPU per node the restart would
wait for a replacement node, as KubeRay starts one for a lost pod."""
EPOCHS = 8
"""Enough that the epochs after the first checkpoint outlast killing a node (under a second an epoch here)."""
MAX_FAILURES = 2
RUN_S = 240
TRAIN_WORKER = "RayTrainWorker"
"""The class of Ray Train V2's worker actors (ray/train/v2/_internal/execution/worker_group/worker.py)."""


def train_args(data: Path, tmp: Path, *, name: str, max_failures: int) -> list[str]:
    """The training tests' tiny run (64 px, 32-d, two steps an epoch, one CPU per worker), data-parallel over two
    workers on different nodes; later options override the earlier ones."""
    return [
        *test_train._train_command(data, tmp, epochs=EPOCHS),
        "--name", name, "--workers", "2", "--placement-strategy", "SPREAD", "--max-failures", str(max_failures),
    ]  # fmt: skip


def start_driver(cluster: LocalRayCluster, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A driver on the cluster's head, as ``ray job submit`` runs one; its output (workers' lines too) in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(args, env=cluster.driver_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def train_workers(cluster: LocalRayCluster) -> list[dict[str, Any]]:
    """Every Ray Train worker actor the cluster had, alive or dead, in the order they were created."""
    found = [a for a in cluster.actors() if a.get("class_name") == TRAIN_WORKER]
    return sorted(found, key=lambda a: a.get("start_time") or 0)


def first_checkpoint_recorded(run: Path, driver: subprocess.Popen[bytes], log: Path) -> bool:
    """Whether the controller registered a checkpoint (it writes its snapshot after it did)."""
    assert driver.poll() is None, f"the driver ended before the first checkpoint:\n{log.read_text()[-4000:]}"
    return any(run.glob("checkpoint_*")) and (run / "checkpoint_manager_snapshot.json").is_file()


def lose_a_worker_node_after_the_first_checkpoint(
    cluster: LocalRayCluster, nodes: tuple[Node, Node], *, run: Path, driver: subprocess.Popen[bytes], log: Path
) -> tuple[Node, list[dict[str, Any]]]:
    """Check that the two workers run on the two worker nodes, then kill the node of one of them as soon as the
    first checkpoint is recorded (the later epochs take a few seconds); returns that node and the first workers."""

    def two_alive() -> list[dict[str, Any]]:
        alive = [w for w in train_workers(cluster) if w["state"] == "ALIVE"]
        return alive if len(alive) == 2 else []

    before = wait_until(two_alive, what="two training workers", timeout_s=RUN_S, every_s=0.5)
    assert {w["node_id"] for w in before} == {n.node_id for n in nodes}, (before, nodes)
    lost = next(n for n in nodes if n.node_id == before[0]["node_id"])
    wait_until(lambda: first_checkpoint_recorded(run, driver, log), what="a first recorded checkpoint",
               timeout_s=RUN_S, every_s=0.05)  # fmt: skip
    cluster.kill_node(lost)
    return lost, before


def train_losing_a_node(
    cluster: LocalRayCluster, data: Path, tmp: Path, name: str, max_failures: int
) -> tuple[tuple[Node, Node], Node, list[dict[str, Any]], int, str]:
    """Two worker nodes, a run of ``train_args`` on them that loses one node after its first checkpoint; returns
    the nodes, the lost one, the first workers, the driver's exit code and its output."""
    nodes = (cluster.add_node(num_cpus=WORKER_CPUS), cluster.add_node(num_cpus=WORKER_CPUS))
    log = tmp / "driver.log"
    driver = start_driver(cluster, train_args(data, tmp, name=name, max_failures=max_failures), log)
    try:
        lost, before = lose_a_worker_node_after_the_first_checkpoint(
            cluster, nodes, run=tmp / "runs" / name, driver=driver, log=log
        )
        rc = driver.wait(timeout=RUN_S)
    finally:
        if driver.poll() is None:  # a test that failed half-way; the fixture stops the cluster
            driver.kill()
            driver.wait()
    return nodes, lost, before, rc, log.read_text()


@pytest.mark.slow
def test_training_on_two_worker_nodes_survives_losing_one_by_resuming_from_its_last_checkpoint(
    local_ray_cluster: LocalRayCluster, tiny_set: Path, tmp_path: Path
) -> None:
    cluster = local_ray_cluster
    nodes, lost, before, rc, output = train_losing_a_node(cluster, tiny_set, tmp_path, "two-nodes", MAX_FAILURES)
    assert rc == 0, output[-4000:]
    survivor = next(n for n in nodes if n is not lost)

    # It went on from a checkpoint, not from scratch, and every epoch was trained.
    resumed = [int(m) for m in re.findall(r"resumed from the checkpoint of epoch (\d+)", output)]
    assert resumed and all(epoch >= 1 for epoch in resumed), output[-4000:]
    assert {int(e) for e in re.findall(rf"epoch (\d+)/{EPOCHS} loss", output)} == set(range(1, EPOCHS + 1))

    # The model file and its card, which the registry accepts (read_card checks the file's SHA-256).
    card_path = next((tmp_path / "models").glob("*.card.json"))
    card = json.loads(card_path.read_text())
    assert card["run"] == "two-nodes" and card["training"]["epochs"] == EPOCHS
    assert Path(card["weights_path"]).is_file() and card_path.with_suffix(".md").is_file()
    assert read_card(card_path).epochs == EPOCHS

    # How: the worker group was restarted (within --max-failures), its new workers on the node that was left.
    workers = train_workers(cluster)
    assert len(workers) % 2 == 0, workers
    restarts = len(workers) // 2 - 1
    assert 1 <= restarts <= MAX_FAILURES and restarts == len(resumed), (restarts, resumed)
    later = [w for w in workers if w["actor_id"] not in {b["actor_id"] for b in before}]
    assert {w["node_id"] for w in later} == {survivor.node_id}, later
    assert all(w["state"] == "DEAD" for w in workers if w["actor_id"] in {b["actor_id"] for b in before})


@pytest.mark.slow
def test_with_no_restarts_allowed_losing_a_worker_node_ends_the_run_saying_so(
    local_ray_cluster: LocalRayCluster, tiny_set: Path, tmp_path: Path
) -> None:
    cluster = local_ray_cluster
    *_, rc, output = train_losing_a_node(cluster, tiny_set, tmp_path, "no-restarts", 0)
    assert rc == 1, output[-4000:]
    assert (
        "training run no-restarts failed (restarts allowed: --max-failures 0);"
        f" its checkpoints stay under {tmp_path / 'runs' / 'no-restarts'}: the same command resumes from the last one"
    ) in output, output[-4000:]
    assert "resumed from the checkpoint" not in output and any((tmp_path / "runs" / "no-restarts").glob("checkpoint_*"))
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").glob("*.card.json"))
    assert len(train_workers(cluster)) == 2  # no second worker group
