"""Shared benchmark plumbing: services, a Serve app and a bare uvicorn app side by side, wrk load.

Every figure is measured in one run on the same machine and reported next to its baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.config import Settings
from serve_app.keys import create_key
from serve_app.store.db import SyncConn, connect, with_database
from serve_app.store.migrate import apply_migrations

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WRK_SCRIPT = ROOT / "benchmarks" / "wrk_report.lua"
BENCH_DB = "trailcam_bench"
BENCH_REDIS_DB = 14

Row = dict[str, Any]


def fetch_value(conn: SyncConn, query: str, params: Sequence[object] = (), *, column: str = "id") -> Any:
    """``column`` of the one row a query returns (an ``INSERT ... RETURNING id``, a ``count(*) AS n``)."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row[column]


# API benchmarks compare the same FastAPI app on Serve and on bare uvicorn, which has no ReID replica:
# the Serve side gets the smallest model so a resnet50 replica's forward passes (health checks, gallery
# loads) do not compete with the ingress for the same two cores.
LIGHT_REID: dict[str, Any] = {
    "architecture": "resnet18",
    "input_size_px": 64,
    "num_cpus": 0,
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
}


def api_app_args(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Serve builder args for the API benchmarks: the given settings, serve_config.yaml's ingress, the light ReID."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ingress = config["applications"][0]["args"].get("ingress", {})
    return {"settings": dict(settings), "ingress": ingress, "reid": LIGHT_REID}


def write_results(name: str, rows: list[Row], *, meta: Mapping[str, Any] | None = None) -> Path:
    """Print the rows and write benchmarks/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload: dict[str, Any] = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    if meta:
        payload["meta"] = dict(meta)
    path.write_text(json.dumps(payload, indent=2))
    for row in rows:
        target = f"  (target {row['target']})" if row.get("target") else ""
        print(f"{name:<14} {row['case']:<48} {row['metric']:<10} {row['value']:>12.3f} {row['unit']}{target}")
    return path


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_settings(**extra: Any) -> dict[str, Any]:
    """Settings overrides for benchmark apps: a dedicated database and Redis db index."""
    base = Settings()
    data = ROOT / ".data" / "bench"
    return {
        "database_url": with_database(base.database_dsn, BENCH_DB),
        "redis_url": base.redis_dsn.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}",
        "image_root": str(ROOT / ".data" / "images"),
        "export_dir": str(data / "exports"),
        **extra,
    }


def prepare_database(settings: Mapping[str, Any]) -> str:
    """Migrate the benchmark database, ensure a site exists, and return an all-sites API key."""
    dsn = str(settings["database_url"])
    apply_migrations(dsn)
    with connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO sites (name) VALUES ('bench') ON CONFLICT (name) DO NOTHING")
        return create_key(conn, sites=None, pepper=Settings().key_pepper, label="bench")


def settings_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """The overrides as TRAILCAM_* environment variables."""
    return {f"TRAILCAM_{k.upper()}": str(v) for k, v in settings.items()}


def wait_http(url: str, timeout_s: float = 120.0) -> None:
    """Poll a URL until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s")


@contextlib.contextmanager
def uvicorn_app(settings: Mapping[str, Any]) -> Iterator[str]:
    """serve_app.ingress:create_app on bare uvicorn (one process), yielding its base URL."""
    port = free_port()
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "serve_app.ingress:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        cwd=ROOT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", 60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def ray_env() -> dict[str, str]:
    """cluster/local/ray.env: the Serve and Ray settings cluster/local/up.sh starts the head with."""
    lines = (ROOT / "cluster" / "local" / "ray.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def private_haproxy_env(state_dir: Path) -> dict[str, str]:
    """Serve HAProxy settings of this process's own Ray: free metrics and stats ports, files under ``state_dir``.

    `make run`'s HAProxy already holds Ray's default metrics (9101) and stats (8404) ports; a second
    HAProxy on the same ones exits with "Some protocols failed to start their listeners".
    """
    return {
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state_dir / "server-state"),
    }


@contextlib.contextmanager
def local_serve() -> Iterator[int]:
    """Serve on a new local Ray with the local head's environment (cluster/local/ray.env); yields the HTTP port.

    The Ray is always a new one (``address="local"``, even with RAY_ADDRESS set: a benchmark must
    never redeploy `make run`'s app), and its HAProxy gets its own ports and files, so benchmarks
    run beside a running app.
    """
    for name, value in ray_env().items():
        os.environ.setdefault(name, value)
    # Short: HAProxy's unix sockets go under <dir>/<56-character node id>/ (sun_path holds 107 bytes).
    state_dir = Path(tempfile.mkdtemp(prefix="tcb-"))
    os.environ.update(private_haproxy_env(state_dir))
    os.environ["PYTHONPATH"] = str(ROOT)
    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def serve_app(args: Mapping[str, Any], *, ready_path: str = "/readyz") -> Iterator[str]:
    """The application on :func:`local_serve`, yielding its base URL once ``ready_path`` answers 200."""
    from ray import serve

    from serve_app.app import build_app

    with local_serve() as port:
        serve.run(build_app(dict(args)), name="trailcam", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + ready_path)
        yield url


def load(
    url: str,
    *,
    method: str = "GET",
    body: str | None = None,
    headers: Mapping[str, str] | None = None,
    connections: int = 1,
    duration_s: float = 5.0,
) -> dict[str, float]:
    """Drive a URL on 127.0.0.1 with wrk; returns p50/p99 (ms), req/s and error counts."""
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        raise ValueError("benchmarks send traffic to 127.0.0.1 only")
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed: run `make bench` (it installs wrk) or `apt-get install wrk`")
    env = {
        **os.environ,
        "WRK_METHOD": method,
        "WRK_BODY": body or "",
        "WRK_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
    }
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            "--timeout",
            "10s",
            "-s",
            str(WRK_SCRIPT),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    seconds = report["duration_us"] / 1e6
    return {
        "p50_ms": report["p50_us"] / 1000,
        "p99_ms": report["p99_us"] / 1000,
        "rps": report["requests"] / seconds if seconds else 0.0,
        "requests": float(report["requests"]),
        "errors": float(report["errors"]),
        "non_2xx": float(report["non_2xx_3xx"]),
    }


def http_rows(case: str, result: Mapping[str, float], *, targets: Mapping[str, str] | None = None) -> list[Row]:
    """Rows for one load result: p50, p99, req/s and bad responses."""
    targets = targets or {}
    return [
        {"case": case, "metric": "p50", "value": result["p50_ms"], "unit": "ms", "target": targets.get("p50")},
        {"case": case, "metric": "p99", "value": result["p99_ms"], "unit": "ms", "target": targets.get("p99")},
        {"case": case, "metric": "req/s", "value": result["rps"], "unit": "req/s", "target": targets.get("req/s")},
        {"case": case, "metric": "errors", "value": result["errors"] + result["non_2xx"], "unit": "responses"},
    ]


@dataclass
class Interleaved:
    """Per server, the load results of each round (round i of every server ran back to back)."""

    rounds: dict[str, list[dict[str, float]]]

    def median(self, server: str) -> dict[str, float]:
        """Median latency and req/s over the rounds; request and error counts summed."""
        results = self.rounds[server]
        summed = {"requests", "errors", "non_2xx"}
        return {
            key: sum(r[key] for r in results) if key in summed else statistics.median(r[key] for r in results)
            for key in results[0]
        }

    def ratio(self, numerator: str, denominator: str) -> float:
        """The median over rounds of numerator/denominator req/s."""
        pairs = zip(self.rounds[numerator], self.rounds[denominator], strict=True)
        return statistics.median(top["rps"] / max(bottom["rps"], 1e-9) for top, bottom in pairs)


def interleaved_load(
    urls: Mapping[str, str], case: HttpCase, *, rounds: int, duration_s: float, connections: int
) -> Interleaved:
    """The same load against every server in alternating rounds.

    Alternating short rounds keeps a drifting machine (a shared VM whose speed changes by tens of
    percent within minutes) from favouring whichever server happens to run in a faster minute.
    """
    out: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            out[name].append(case.load(url, connections=connections, duration_s=duration_s))
    return Interleaved(out)


@dataclass(frozen=True)
class HttpCase:
    """One request shape driven against both servers; ``rejected`` cases count any non-4xx as an error."""

    name: str
    path: str
    method: str = "GET"
    body: str | None = None
    headers: Mapping[str, str] | None = None
    rejected: bool = False

    def load(self, base_url: str, *, connections: int, duration_s: float) -> dict[str, float]:
        """This request against one server."""
        return load(
            base_url + self.path,
            method=self.method,
            body=self.body,
            headers=self.headers,
            connections=connections,
            duration_s=duration_s,
        )


def serve_vs_uvicorn(
    settings: Mapping[str, Any],
    cases: list[HttpCase],
    *,
    connections: tuple[int, ...] = (1, 16),
    rounds: int = 3,
    round_s: float = 3.0,
    targets: Mapping[tuple[str, str, int], Mapping[str, str]] | None = None,
    ratio_targets: Mapping[tuple[str, int], str] | None = None,
) -> list[Row]:
    """Both servers up at once, each case measured in alternating rounds; rows per server and ratios.

    ``round_s`` is per server per round; the figures are medians over the ``rounds``.
    """
    targets, ratio_targets = targets or {}, ratio_targets or {}
    rows: list[Row] = []
    with uvicorn_app(settings) as uvicorn_url, serve_app(api_app_args(settings)) as serve_url:
        urls = {"uvicorn": uvicorn_url, "serve": serve_url}
        for case in cases:
            for url in urls.values():  # warm-up
                case.load(url, connections=4, duration_s=1)
            for conns in connections:
                measured = interleaved_load(urls, case, rounds=rounds, duration_s=round_s, connections=conns)
                for server in urls:
                    res = measured.median(server)
                    case_rows = http_rows(
                        f"{case.name} {server} c={conns}", res, targets=targets.get((case.name, server, conns))
                    )
                    if case.rejected:  # every answer should be a 4xx: count the others as errors
                        case_rows[-1]["value"] = res["errors"] + res["requests"] - res["non_2xx"]
                    rows += case_rows
                rows.append(
                    {
                        "case": f"{case.name} c={conns}",
                        "metric": "serve/uvicorn",
                        "value": measured.ratio("serve", "uvicorn"),
                        "unit": "x req/s",
                        "target": ratio_targets.get((case.name, conns)),
                    }
                )
    return rows
