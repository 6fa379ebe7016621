"""`make bench` beside `make run`: the benchmarks' own Serve must start while the app's HAProxy runs.

Both start Serve's HAProxy from the same settings (cluster/local/ray.env and Ray's defaults for
its metrics and stats ports and its files). The stand-in for the running app takes those ports
from the environment, which the benchmark process inherits too, so a benchmark that uses them
collides exactly as it would with the defaults.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.ray_cluster import free_port

ROOT = Path(__file__).resolve().parents[2]

RUNNING_APP = """
import os, sys
from benchmarks.common import ray_env
for name, value in ray_env().items():
    os.environ.setdefault(name, value)
import ray
from ray import serve
ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})

@serve.deployment(ray_actor_options={"num_cpus": 0})
def running(request):
    return "running app"

serve.run(running.bind(), name="running", route_prefix="/")
print("ready", flush=True)
sys.stdin.read()  # until the test closes stdin
serve.shutdown()
ray.shutdown()
"""

BENCHMARK_SIDE = """
import httpx
from ray import serve
from benchmarks.common import local_serve, wait_http

with local_serve() as port:
    @serve.deployment(ray_actor_options={"num_cpus": 0})
    def bench(request):
        return "benchmark app"

    serve.run(bench.bind(), name="bench", route_prefix="/")
    wait_http(f"http://127.0.0.1:{port}/", 120)
    print(httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text, flush=True)
"""


@pytest.fixture
def haproxy_env() -> dict[str, str]:
    """The environment both processes start from: HAProxy on, the same metrics and stats ports."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        }
    )
    return env


@pytest.fixture
def running_app(haproxy_env: dict[str, str]) -> Iterator[int]:
    """A Serve app with HAProxy in its own local Ray, standing in for `make run`'s; yields its HTTP port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNING_APP, str(port)],
        cwd=ROOT,
        env=haproxy_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready", "the stand-in app did not start"
        yield port
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.slow
def test_benchmark_serve_starts_beside_a_running_app(running_app: int, haproxy_env: dict[str, str]) -> None:
    bench = subprocess.run(
        [sys.executable, "-c", BENCHMARK_SIDE],
        cwd=ROOT,
        env=haproxy_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert bench.stdout.strip().splitlines()[-1] == "benchmark app"
    # The running app kept serving throughout.
    assert httpx.get(f"http://127.0.0.1:{running_app}/", timeout=10).text == "running app"
