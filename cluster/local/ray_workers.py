"""Worker nodes beside a Ray head on this machine: ``TRAILCAM_RAY_WORKER_NODES=N make run`` starts N of them.

Each worker is a Ray node of its own (``ray start --address``) with its own temp dir, ports and logical
CPUs, the custom resource ``worker_node`` and the node label ``trailcam/group=cpu``: the role the ``cpu``
worker group of cluster/kuberay/*.yaml plays on Kubernetes. They are stopped by PID, only the processes
whose command line names a worker's temp dir, and their children (``ray stop`` would end every Ray on the
machine). tests/fixtures/multinode.py and benchmarks/bench_multinode.py start their nodes, and a head of
their own on free ports (``head_command``), with the same commands.

    python cluster/local/ray_workers.py start --address 127.0.0.1:6380 --count 2 --num-cpus 2 \\
        --temp-root .data/ray-workers --record .data/ray-workers.started
    python cluster/local/ray_workers.py stop .data/ray-workers.started
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

WORKER_RESOURCE = "worker_node"
"""Custom resource every worker node offers once (``resources={"worker_node": 0.01}`` keeps work off the head)."""
WORKER_LABELS = {"trailcam/group": "cpu"}
"""Node labels of the local workers: the KubeRay worker group whose role they play."""
STOP_GRACE_S = 15.0


_GIVEN: set[int] = set()
"""Ports this process handed out: the kernel readily gives a port just closed again."""


def free_ports(n: int) -> list[int]:
    """``n`` different unused loopback TCP ports, none handed out before by this process."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:  # the sockets stay open until all are chosen, so none comes twice
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port not in _GIVEN:
                ports.append(port)
                _GIVEN.add(port)
        return ports


def free_port() -> int:
    """An unused loopback TCP port (see ``free_ports``)."""
    return free_ports(1)[0]


def ray_executable() -> str:
    """The ``ray`` CLI beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


@dataclass(frozen=True)
class WorkerNode:
    """A worker node as started: its temp dir (which names all its processes) and its node manager port."""

    temp_dir: Path
    node_manager_port: int

    def processes(self) -> list[psutil.Process]:
        """The node's live processes (raylet, agents, workers)."""
        return processes_under(self.temp_dir)

    def raylet(self) -> psutil.Process | None:
        """The node's raylet, or None once it is gone."""
        return raylet_process(self.node_manager_port)


NODE_PORT_OPTIONS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")  # fmt: skip


def node_ports(node_manager_port: int) -> list[str]:
    """``ray start`` options giving a node its own free ports (several nodes share this host and its loopback;
    Ray's fixed defaults, such as the agent's 52365, would collide)."""
    ports = [node_manager_port, *free_ports(len(NODE_PORT_OPTIONS) - 1)]
    return [
        *(arg for option, port in zip(NODE_PORT_OPTIONS, ports, strict=True) for arg in (option, str(port))),
        "--min-worker-port", "0", "--max-worker-port", "0",  # 0: each worker process binds a port the OS picks
    ]  # fmt: skip


def worker_command(
    *,
    address: str,
    temp_dir: Path,
    node_manager_port: int,
    num_cpus: int,
    resources: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    object_store_bytes: int | None = None,
) -> list[str]:
    """``ray start --address`` for one worker node on 127.0.0.1."""
    command = [
        ray_executable(), "start", "--address", address, "--node-ip-address", "127.0.0.1",
        *node_ports(node_manager_port),
        "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]  # fmt: skip
    if resources:
        command += ["--resources", json.dumps(dict(resources))]
    if labels:
        command += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
    if object_store_bytes:
        command += ["--object-store-memory", str(object_store_bytes)]
    return command


def head_command(
    *,
    temp_dir: Path,
    gcs_port: int,
    dashboard_port: int,
    client_port: int,
    node_manager_port: int,
    num_cpus: int,
    object_store_bytes: int | None = None,
) -> list[str]:
    """``ray start --head`` on free ports for a cluster of its own beside any other (tests, benchmarks)."""
    command = [
        ray_executable(), "start", "--head", "--port", str(gcs_port), "--node-ip-address", "127.0.0.1",
        *node_ports(node_manager_port), "--num-cpus", str(num_cpus),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(client_port), "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]  # fmt: skip
    if object_store_bytes:
        command += ["--object-store-memory", str(object_store_bytes)]
    return command


def client_server(port: int) -> psutil.Process | None:
    """A head's Ray client server, found by its port (its command line names no temp dir)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "ray.util.client.server" in cmdline and f"--port={port}" in cmdline:
            return proc
    return None


def start_worker(
    *,
    address: str,
    temp_dir: Path,
    num_cpus: int,
    resources: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    object_store_bytes: int | None = None,
    env: Mapping[str, str] | None = None,
) -> WorkerNode:
    """Start one worker node and return once ``ray start`` has; its raylet is then registered with the head."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = worker_command(
        address=address, temp_dir=temp_dir, node_manager_port=port, num_cpus=num_cpus,
        resources={WORKER_RESOURCE: 1, **(resources or {})}, labels={**WORKER_LABELS, **(labels or {})},
        object_store_bytes=object_store_bytes,
    )  # fmt: skip
    out = subprocess.run(command, env=dict(env or os.environ), capture_output=True, text=True, check=False)
    node = WorkerNode(temp_dir, port)
    if out.returncode != 0 or node.raylet() is None:
        stop_nodes([temp_dir])
        raise RuntimeError(f"worker node did not start ({' '.join(command)}):\n{out.stdout}\n{out.stderr}")
    return node


def processes_under(temp_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``temp_dir`` (every process of a node started with it)."""
    needle = str(temp_dir)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info.get("cmdline") or []
        except psutil.Error:
            continue
        # The dir itself or a path under it (w1 must not match w10's processes).
        if proc.pid != os.getpid() and any(arg.endswith(needle) or needle + "/" in arg for arg in cmdline):
            found.append(proc)
    return found


def raylet_process(node_manager_port: int) -> psutil.Process | None:
    """The raylet listening as node manager on ``node_manager_port``, if one runs."""
    flag = f"--node_manager_port={node_manager_port}"
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and Path(cmdline[0]).name == "raylet" and flag in cmdline:
            return proc
    return None


def raylet_under(temp_dir: Path) -> psutil.Process | None:
    """The raylet of the node started with ``temp_dir``, if it runs."""
    flag = f"--temp_dir={temp_dir}"
    for proc in processes_under(temp_dir):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if cmdline and Path(cmdline[0]).name == "raylet" and flag in cmdline:
            return proc
    return None


def stop_processes(procs: Iterable[psutil.Process], *, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM the processes and their children, SIGKILL what is left after ``grace_s``; returns how many."""
    everyone: dict[int, psutil.Process] = {}
    for proc in procs:
        everyone[proc.pid] = proc
        try:
            everyone.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for proc in everyone.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(everyone.values()), timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(everyone)


def stop_nodes(temp_dirs: Iterable[Path], *, grace_s: float = STOP_GRACE_S) -> int:
    """Stop every process of the nodes started with these temp dirs; returns how many were stopped."""
    procs = [proc for temp_dir in temp_dirs for proc in processes_under(temp_dir)]
    return stop_processes(procs, grace_s=grace_s)


def recorded(record: Path) -> list[Path]:
    """The temp dirs a record file lists (one a line)."""
    if not record.exists():
        return []
    return [Path(line) for line in record.read_text().splitlines() if line.strip()]


def start(args: argparse.Namespace) -> int:
    """Start workers until ``--count`` of the recorded ones run (so running it twice adds none)."""
    record = Path(args.record)
    running = [d for d in recorded(record) if raylet_under(d)]
    root = Path(args.temp_root).resolve()
    started = []
    for i in range(1, args.count + 1):
        temp_dir = root / f"w{i}"
        if temp_dir in running:
            continue
        stop_nodes([temp_dir])  # what a worker whose raylet died left behind (its log monitor)
        start_worker(address=args.address, temp_dir=temp_dir, num_cpus=args.num_cpus)
        started.append(temp_dir)
        record.write_text("".join(f"{d}\n" for d in dict.fromkeys([*running, *started])))
    print(
        f"{len(started)} Ray worker node(s) started, {args.count - len(started)} already running"
        f" ({args.num_cpus} CPUs, resource {WORKER_RESOURCE}, labels {WORKER_LABELS}; temp dirs under {root})"
    )
    return 0


def stop(args: argparse.Namespace) -> int:
    """Stop the recorded workers by PID and remove the record."""
    record = Path(args.record)
    dirs = recorded(record)
    print(f"stopped {len(dirs)} Ray worker node(s) ({stop_nodes(dirs)} processes)")
    record.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: start or stop."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("start", help="start worker nodes and record their temp dirs")
    up.add_argument("--address", required=True, help="the head's GCS address (127.0.0.1:PORT)")
    up.add_argument("--count", type=int, required=True, help="worker nodes that should run")
    up.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of each worker node")
    up.add_argument("--temp-root", required=True, help="each worker's temp dir is TEMP_ROOT/w<i>")
    up.add_argument("--record", required=True, help="file listing the started workers' temp dirs")
    down = sub.add_parser("stop", help="stop the recorded worker nodes by PID")
    down.add_argument("record", help="the file `start --record` wrote")
    args = parser.parse_args(argv)
    return start(args) if args.command == "start" else stop(args)


if __name__ == "__main__":
    raise SystemExit(main())
