"""The soak's memory watch: every process's RSS over time, the metric series Ray's agents export, the replicas'
own reports of what grew, and the verdict.

Verdict: after a warm-up (the first third of the run unless told; for a process that starts later, from
PROCESS_WARMUP_S after its first sample), a least-squares line through each process's RSS over a window of
at least MIN_WINDOW_S. A process rises when its slope reaches ``MAX_SLOPE_MIB_PER_MIN`` or its growth over
the window reaches ``MAX_GROWTH_FRACTION`` of its mean RSS. The absolute slope is the rule that matters for
a product that runs for weeks: 0.5 MiB/min is 720 MiB a day. The run passes when every judged process (the
project's own and Ray's dashboard agent, which holds every metric series) is flat; Ray's other processes are
reported beside them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from serve_app.exports.task import TASK_NAME

SAMPLE_EVERY_S = 5.0
MAX_SLOPE_MIB_PER_MIN = 0.5
MAX_GROWTH_FRACTION = 0.05
MIN_WINDOW_SAMPLES = 6
MIN_WINDOW_S = 300.0
PROCESS_WARMUP_S = 120.0
JUDGED_RAY = ("ray::DashboardAgent",)
PROJECT_TITLES = ("ray::ServeReplica:trailcam:", f"ray::{TASK_NAME}")
"""Process titles of the project's own code (Serve replicas of the app, export tasks); the rest is Ray's."""
SERIES_EVERY_S = 60.0


def process_label(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return f"pid-{proc.pid}"
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    for name in ("gcs_server", "raylet", "dashboard/agent", "dashboard", "log_monitor", "runtime_env", "haproxy"):
        if name in cmd:
            return "ray::DashboardAgent" if name == "dashboard/agent" else name
    return Path(cmd.split()[0]).name if cmd else f"pid-{proc.pid}"


@dataclass
class MemoryWatch:
    """RSS (MiB) of this driver and every process Ray started under it, every SAMPLE_EVERY_S; keyed by PID.
    A process keeps the project label once it has carried one (a task worker is ``ray::IDLE`` between tasks)."""

    started: float = field(default_factory=time.monotonic)
    samples: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    labels: dict[int, str] = field(default_factory=dict)
    busy: set[int] = field(default_factory=set)
    """PIDs seen with a title other than ``ray::IDLE`` (workers that did something)."""

    @classmethod
    def from_samples(cls, saved: dict[str, list[list[float]]]) -> MemoryWatch:
        """A watch rebuilt from a report's ``memory_samples`` ("label [pid]" -> [[s, MiB], ...])."""
        watch = cls()
        for name, points in saved.items():
            label, _, pid_text = name.rpartition(" [")
            pid = int(pid_text.rstrip("]"))
            watch.samples[pid] = [(float(t), float(m)) for t, m in points]
            watch.labels[pid] = label
            if label != "ray::IDLE":
                watch.busy.add(pid)
        return watch

    def sample(self) -> None:
        me = psutil.Process()
        now = time.monotonic() - self.started
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss / 2**20
            except psutil.Error:
                continue
            label = "soak driver" if proc.pid == me.pid else process_label(proc)
            self.samples[proc.pid].append((now, rss))
            if not self.labels.get(proc.pid, "").startswith(PROJECT_TITLES):
                self.labels[proc.pid] = label
            if label != "ray::IDLE":
                self.busy.add(proc.pid)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sample()
            stop.wait(SAMPLE_EVERY_S)

    def rows(self, *, warmup_s: float) -> dict[str, dict[str, Any]]:
        """The trend of each process with a long enough window after its warm-up; idle workers that never ran
        a task and processes that came and went too quickly to judge are left out."""
        out = {}
        for pid, points in self.samples.items():
            if pid not in self.busy:
                continue
            t = trend(points, warmup_s=max(warmup_s, points[0][0] + PROCESS_WARMUP_S))
            if t is not None:
                label = self.labels[pid]
                out[f"{label} [{pid}]"] = {**t, "group": group_of(label), "judged": judged(label)}
        return out


def group_of(label: str) -> str:
    if label.startswith(PROJECT_TITLES):
        return "project"
    return "driver" if label == "soak driver" else "ray"


def judged(label: str) -> bool:
    """Whether the process's trend decides the run: the project's own processes and Ray's dashboard agent."""
    return label.startswith(PROJECT_TITLES) or label in JUDGED_RAY


def trend(points: list[tuple[float, float]], *, warmup_s: float) -> dict[str, Any] | None:
    """Slope of a least-squares line through the samples after ``warmup_s``, its growth over that window, and
    the verdict; None when the window holds too few samples to fit."""
    window = [p for p in points if p[0] >= warmup_s and p[1] > 0]  # 0: a process exiting
    if len(window) < MIN_WINDOW_SAMPLES or window[-1][0] - window[0][0] < MIN_WINDOW_S:
        return None
    xs = np.array([p[0] for p in window])
    ys = np.array([p[1] for p in window])
    slope_per_min = float(np.polyfit(xs / 60.0, ys, 1)[0])
    growth = slope_per_min * float(xs[-1] - xs[0]) / 60.0
    fraction = growth / float(ys.mean())
    rising = slope_per_min >= MAX_SLOPE_MIB_PER_MIN or fraction >= MAX_GROWTH_FRACTION
    return {
        "slope_mib_per_min": round(slope_per_min, 3),
        "growth_mib": round(growth, 1),
        "growth_fraction": round(fraction, 4),
        "window_min": round(float(xs[-1] - xs[0]) / 60.0, 1),
        "first_mib": round(points[0][1], 1),
        "window_first_mib": round(window[0][1], 1),
        "last_mib": round(points[-1][1], 1),
        "max_mib": round(max(p[1] for p in points), 1),
        "verdict": "rising" if rising else "flat",
    }


def verdict(rows: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """(passed, one line): passed when at least one project process was judged and every judged one is flat."""
    judged_rows = {name: row for name, row in rows.items() if row["judged"]}
    if not any(row["group"] == "project" for row in judged_rows.values()):
        return False, "no verdict: no project process has a long enough window after the warm-up"
    rising = [f"{name} ({row['group']})" for name, row in sorted(judged_rows.items()) if row["verdict"] == "rising"]
    others = [name for name, row in sorted(rows.items()) if not row["judged"] and row["verdict"] == "rising"]
    note = f"; also rising, not judged: {', '.join(others)}" if others else ""
    if rising:
        return False, f"rising: {', '.join(rising)}{note}"
    return True, f"flat: every judged process under the limits{note}"


def metric_series(url: str) -> Counter[str]:
    """Series per metric family on one node's metrics export endpoint (Prometheus text)."""
    text = httpx.get(url, timeout=10).text
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            counts[line.split("{", 1)[0].split(" ", 1)[0]] += 1
    return counts


def metrics_urls() -> list[str]:
    """The metrics export endpoint of every alive Ray node (the dashboard agent serves it)."""
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()  # type: ignore[no-untyped-call]
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


@dataclass
class SeriesWatch:
    """How many metric series the nodes export, over time, and which families grew (an unbounded label
    shows here first)."""

    started: float = field(default_factory=time.monotonic)
    totals: list[tuple[float, int]] = field(default_factory=list)
    first: Counter[str] | None = None
    last: Counter[str] = field(default_factory=Counter)

    def sample(self) -> None:
        counts: Counter[str] = Counter()
        for url in metrics_urls():
            try:
                counts.update(metric_series(url))
            except httpx.HTTPError:
                continue
        if self.first is None:
            self.first = counts
        self.last = counts
        self.totals.append((round(time.monotonic() - self.started, 1), sum(counts.values())))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sample()
            stop.wait(SERIES_EVERY_S)

    def report(self, *, top: int = 10) -> dict[str, Any]:
        first = self.first or Counter()
        grown = sorted(((name, n - first.get(name, 0)) for name, n in self.last.items()), key=lambda x: -x[1])
        return {
            "totals": self.totals,
            "grown_families": [{"family": name, "series_delta": d} for name, d in grown[:top] if d > 0],
        }


def replica_reports(app_name: str, deployments: tuple[str, ...], *, top: int = 10) -> dict[str, Any]:
    """Each deployment's own memory report (serve_app/diagnostics.py) through a Serve handle."""
    from ray import serve

    out = {}
    for name in deployments:
        try:
            handle = serve.get_deployment_handle(name, app_name=app_name)
            out[name] = handle.memory_report.remote(top=top).result(timeout_s=120)
        except Exception as exc:
            out[name] = {"error": repr(exc)}
    return out


def markdown_rows(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| group | process | first MiB | window start MiB | last MiB | max MiB | window min | slope MiB/min | growth |"
        " verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {"project": 0, "ray": 1, "driver": 2}
    for name, t in sorted(rows.items(), key=lambda kv: (order[kv[1]["group"]], kv[0])):
        lines.append(
            f"| {t['group']} | {name} | {t['first_mib']} | {t['window_first_mib']} | {t['last_mib']} | {t['max_mib']} |"
            f" {t['window_min']} | {t['slope_mib_per_min']} | {t['growth_mib']} MiB ({t['growth_fraction']:.1%}) |"
            f" {t['verdict']}{'' if t['judged'] else ' (not judged)'} |"
        )
    return lines
