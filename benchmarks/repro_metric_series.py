"""Ray alone, no project code: how the metric series a node's dashboard agent exports grow with task names.

Ray labels its ``ray_tasks`` series with the task's name; a name that carries an id (one per job) adds series
for every job, and the agent holds and exports them all. This script runs ``--tasks`` tiny tasks twice, once
with one shared name and once with a name per task, and prints the series count after each round:

    .venv/bin/python -m benchmarks.repro_metric_series --tasks 300

The rounds are measured in one Ray session; the per-task-name round is the one that grows, and the series
stay after the tasks ended. ``RAY_metric_cardinality_level=low`` (Ray drops the name label) keeps them flat.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import ray

from benchmarks.soak_memory import metric_series, metrics_urls

SETTLE_S = 12.0  # a few of the agent's export intervals (RAY_metrics_report_interval_ms, 5 s by default)


@ray.remote(num_cpus=0.5)
def tiny(i: int) -> int:
    return i


def series_now() -> Counter[str]:
    counts: Counter[str] = Counter()
    for url in metrics_urls():
        counts.update(metric_series(url))
    return counts


def round_of(tasks: int, *, unique_names: bool) -> None:
    refs = [tiny.options(name=f"job-{i:06d}" if unique_names else "job").remote(i) for i in range(tasks)]
    ray.get(refs)
    time.sleep(SETTLE_S)  # the agent exports what workers reported over its last interval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--linger-s", type=float, default=60.0, help="then wait idle this long and count again")
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, configure_logging=False, log_to_driver=False)
    try:
        time.sleep(SETTLE_S)
        base = series_now()
        print(f"start: {sum(base.values())} series, ray_tasks {base['ray_tasks']}")
        round_of(args.tasks, unique_names=False)
        shared = series_now()
        print(f"after {args.tasks} tasks with one name: {sum(shared.values())} series, ray_tasks {shared['ray_tasks']}")
        round_of(args.tasks, unique_names=True)
        unique = series_now()
        print(
            f"after {args.tasks} tasks with a name each: {sum(unique.values())} series, ray_tasks {unique['ray_tasks']}"
        )
        time.sleep(args.linger_s)
        later = series_now()
        print(f"{args.linger_s:.0f} s later, idle: {sum(later.values())} series, ray_tasks {later['ray_tasks']}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
