"""Stop the Ray head that `make run` started, by PID: only processes whose command line names
its own temp dir (``ray stop`` would also end every other Ray on the machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil

VENV = str(Path(__file__).resolve().parents[2] / ".venv")


def head_processes(temp_dir: str, gcs_port: int) -> list[psutil.Process]:
    """Processes of the head: their command line names its temp dir, or runs this checkout's venv
    against its GCS port (the Ray client server names neither the temp dir nor a session)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        ours = temp_dir in cmdline or (VENV in cmdline and f":{gcs_port} " in cmdline + " ")
        if ours and proc.pid != psutil.Process().pid:
            found.append(proc)
    return found


def stop(temp_dir: str, *, gcs_port: int, grace_s: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after the grace period; returns how many processes were stopped."""
    procs = head_processes(temp_dir, gcs_port)
    children = []
    for proc in procs:
        try:
            children += proc.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    everyone = {p.pid: p for p in procs + children}.values()
    for proc in everyone:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(everyone), timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return len(everyone)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "stop":
        raise SystemExit("usage: ray_head.py stop TEMP_DIR GCS_PORT")
    print(f"stopped the Ray head ({stop(sys.argv[2], gcs_port=int(sys.argv[3]))} processes)")
