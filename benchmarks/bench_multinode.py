"""Backfill detections/s with the same logical CPUs on one worker node and spread over two, side by side.

Two local clusters run at once, each a head without CPUs for work (as on KubeRay) and worker nodes started
with cluster/local/ray_workers.py: one worker node with 4 logical CPUs, or two with 2 each. The same backfill
(serve_config.yaml's model, two embedding actors of one torch thread each, small read blocks so that the read
and decode tasks spread too) runs on each in alternating rounds, as a driver on the head (``ray job submit``'s
shape). Every node shares this machine's cores, so on a 2-core VM the ratio is what spreading costs (blocks
moved between nodes' object stores, a second raylet and its agents), not a speed-up. The rate is the run's own
(``backfill_runs``: detections done over started to finished). ``--quick`` (or BENCH_QUICK=1): fewer
detections, one round.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import yaml

from batch.demo_data import DemoParams, load_demo
from benchmarks.common import ROOT, bench_settings, fetch_value, prepare_database, ray_env, write_results
from cluster.local.ray_workers import (
    client_server,
    free_port,
    head_command,
    processes_under,
    start_worker,
    stop_processes,
)
from serve_app.config import Settings
from serve_app.store.db import connect

TOTAL_CPUS = 4
"""Logical CPUs for work in either cluster (two actors at one CPU, read, decode and write tasks beside)."""
OBJECT_STORE_BYTES = 512 * 1024**2
RUN_S = 600
RUN_LINE = re.compile(r"^run ([0-9a-f-]{36}): (\w+)", re.MULTILINE)


@dataclass
class LocalCluster:
    """A head (no CPUs) and worker nodes on free ports, each in its own temp dir under ``root``."""

    name: str
    root: Path
    worker_cpus: tuple[int, ...]
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    client_port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        """The GCS address a driver connects to."""
        return f"127.0.0.1:{self.gcs_port}"

    def temp_dirs(self) -> list[Path]:
        """The head's and every worker's temp dir."""
        return [self.root / "h", *(self.root / f"w{i}" for i in range(len(self.worker_cpus)))]

    def start(self, env: Mapping[str, str]) -> None:
        """Start the head, then the workers; returns once every worker node is ALIVE at the head."""
        command = head_command(
            temp_dir=self.root / "h", gcs_port=self.gcs_port, dashboard_port=self.dashboard_port,
            client_port=self.client_port, node_manager_port=free_port(), num_cpus=0,
            object_store_bytes=OBJECT_STORE_BYTES,
        )  # fmt: skip
        subprocess.run(command, env=dict(env), check=True, capture_output=True)
        for i, cpus in enumerate(self.worker_cpus):
            start_worker(address=self.address, temp_dir=self.root / f"w{i}", num_cpus=cpus,
                         object_store_bytes=OBJECT_STORE_BYTES, env=env)  # fmt: skip
        self.wait_for_workers()

    def wait_for_workers(self, timeout_s: float = 120.0) -> None:
        """Poll the head's state API until it lists every worker ALIVE."""
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(Exception):
                nodes = list_nodes(address=f"http://127.0.0.1:{self.dashboard_port}", limit=100)
                if sum(1 for n in nodes if n.state == "ALIVE" and not n.is_head_node) == len(self.worker_cpus):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: worker nodes not ALIVE after {timeout_s} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop every process of the cluster by PID (the nodes' and their children, the client server)."""
        procs = [p for d in self.temp_dirs() for p in processes_under(d)]
        if client := client_server(self.client_port):
            procs.append(client)
        stop_processes(procs, grace_s=5)


@contextlib.contextmanager
def local_clusters(shapes: Mapping[str, tuple[int, ...]], env: Mapping[str, str]) -> Iterator[list[LocalCluster]]:
    """The clusters, all up at once; stopped and their temp dirs removed afterwards."""
    # Short paths: a node's unix sockets go under <temp dir>/session_<...>/sockets/ (107 bytes at most).
    root = Path(tempfile.mkdtemp(prefix="bm-"))
    clusters = [LocalCluster(name, root / f"c{i}", cpus) for i, (name, cpus) in enumerate(shapes.items())]
    try:
        for cluster in clusters:
            cluster.start(env)
        yield clusters
    finally:
        for cluster in clusters:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def backfill(cluster: LocalCluster, args: list[str], *, env: Mapping[str, str], dsn: str) -> float:
    """One backfill run as a driver on the cluster's head: its detections/s from its ``backfill_runs`` row."""
    out = subprocess.run(
        [sys.executable, "-m", "batch.backfill", *args], env={**env, "RAY_ADDRESS": cluster.address}, cwd=ROOT,
        capture_output=True, text=True, timeout=RUN_S, check=False,
    )  # fmt: skip
    found = RUN_LINE.search(out.stdout)
    if out.returncode != 0 or found is None or found.group(2) != "completed":
        raise RuntimeError(f"backfill on {cluster.name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    with connect(dsn) as conn:
        query = "SELECT done / extract(epoch FROM finished_at - started_at) AS rate FROM backfill_runs WHERE id = %s"
        return float(fetch_value(conn, query, (found.group(1),), column="rate"))


def main(argv: list[str] | None = None) -> None:
    """Load the demo data into the benchmark database, run the backfill on both clusters in alternating rounds."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1")
    parser.add_argument("--detections", type=int, help="detections scored per run")
    parser.add_argument("--rounds", type=int, help="runs on each cluster, alternating (default 3, quick 1)")
    args = parser.parse_args(argv)
    n = args.detections or (300 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 3)
    overrides = bench_settings()
    prepare_database(overrides)
    settings = Settings(**overrides)
    dsn = settings.database_dsn
    params = DemoParams(2, 6, 40, max(n, 1500), 7)  # bench_backfill's full demo set: rendered once for both
    load_demo(dsn, image_root=settings.image_root, params=params, workers=None)
    with psycopg.connect(dsn) as conn:
        pattern = f"Demo site % [{params.signature()}]"
        sites = [str(r[0]) for r in conn.execute("SELECT id FROM sites WHERE name LIKE %s ORDER BY id", (pattern,))]
    reid = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]["reid"]
    model = f"{reid['architecture']}:{reid.get('weights', 'imagenet')}"
    common = [
        "--mode", "all", "--model", model, "--input-size-px", str(reid["input_size_px"]), "--batch-size", "32",
        "--actors", "2", "--cpu-threads", "1", "--rows-per-block", "8",
        "--database-url", dsn, "--image-root", str(Path(settings.image_root).resolve()),
        *(arg for site in sites for arg in ("--site", site)),
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.update({k: v for k, v in ray_env().items() if k not in os.environ})  # as make run's head has it
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    one, two = f"1 worker node x {TOTAL_CPUS} CPUs", f"2 worker nodes x {TOTAL_CPUS // 2} CPUs"
    rates: dict[str, list[float]] = {one: [], two: []}
    with local_clusters({one: (TOTAL_CPUS,), two: (TOTAL_CPUS // 2, TOTAL_CPUS // 2)}, env) as clusters:
        for cluster in clusters:  # warm-up: gallery embeddings stored, model files in the page cache
            backfill(cluster, [*common, "--limit", "64"], env=env, dsn=dsn)
        for _ in range(rounds):
            for cluster in clusters:
                rates[cluster.name].append(backfill(cluster, [*common, "--limit", str(n)], env=env, dsn=dsn))
    ratios = [b / a for a, b in zip(rates[one], rates[two], strict=True)]
    case = f"{reid['architecture']} {reid['input_size_px']}px, {n} detections, 2 actors"
    rows = [
        {"case": f"backfill on {one} ({case})", "metric": "det/s", "value": statistics.median(rates[one]),
         "unit": "det/s"},
        {"case": f"backfill on {two} ({case})", "metric": "det/s", "value": statistics.median(rates[two]),
         "unit": "det/s"},
        {"case": f"2 nodes / 1 node, same {TOTAL_CPUS} CPUs on one {os.cpu_count()}-core host: the cost of spreading",
         "metric": "ratio", "value": statistics.median(ratios), "unit": "x"},
    ]  # fmt: skip
    write_results("multinode", rows, meta={"quick": args.quick, "cpus": os.cpu_count(), "rounds": rates})


if __name__ == "__main__":
    main()
