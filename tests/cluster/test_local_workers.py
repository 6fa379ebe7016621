"""cluster/local/ray_workers.py (``TRAILCAM_RAY_WORKER_NODES=N make run``) against a head on free ports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from cluster.local.ray_workers import WORKER_LABELS, WORKER_RESOURCE, processes_under, raylet_under
from tests.fixtures.multinode import LocalRayCluster
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local" / "ray_workers.py"


def workers_cli(cluster: LocalRayCluster, *args: str) -> str:
    """Run the script as up.sh and down.sh do; its output."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=cluster.env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"ray_workers.py {args[0]} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_worker_nodes_join_with_their_cpus_resource_and_label_then_stop_by_pid(
    local_ray_cluster: LocalRayCluster, tmp_path: Path
) -> None:
    cluster = local_ray_cluster
    temp_root, record = cluster.root, tmp_path / "ray-workers.started"
    start = ["start", "--address", cluster.gcs_address, "--count", "2", "--num-cpus", "3",
             "--temp-root", str(temp_root), "--record", str(record)]  # fmt: skip
    assert "2 Ray worker node(s) started" in workers_cli(cluster, *start)

    def workers_alive() -> list[dict[str, Any]]:
        return [n for n in cluster.nodes() if not n["is_head_node"] and n["state"] == "ALIVE"]

    wait_until(lambda: len(workers_alive()) == 2, what="two worker nodes ALIVE")
    for node in workers_alive():
        assert node["resources_total"]["CPU"] == 3
        assert node["resources_total"][WORKER_RESOURCE] == 1
        assert {k: node["labels"][k] for k in WORKER_LABELS} == WORKER_LABELS
    dirs = [Path(line) for line in record.read_text().splitlines()]
    assert dirs == [temp_root / "w1", temp_root / "w2"]

    # Running it again (make run twice) adds no node; it replaces one whose raylet died.
    assert "0 Ray worker node(s) started, 2 already running" in workers_cli(cluster, *start)
    assert len(workers_alive()) == 2
    crashed = raylet_under(dirs[1])
    assert crashed is not None
    crashed.kill()
    wait_until(lambda: len(workers_alive()) == 1, what="the head to see the crashed worker DEAD", timeout_s=60)
    assert "1 Ray worker node(s) started, 1 already running" in workers_cli(cluster, *start)
    wait_until(lambda: len(workers_alive()) == 2, what="two worker nodes ALIVE again")

    # Their workers and agents rename themselves (ray::IDLE, ray::DashboardAgent): they are the raylets' children.
    started = [p for d in dirs for proc in processes_under(d) for p in (proc, *proc.children(recursive=True))]
    assert "stopped 2 Ray worker node(s)" in workers_cli(cluster, "stop", str(record))
    assert not record.exists()
    assert not [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    wait_until(lambda: not workers_alive(), what="the head to see both workers gone", timeout_s=60)
    assert [n["state"] for n in cluster.nodes() if n["is_head_node"]] == ["ALIVE"]  # the head is not touched
