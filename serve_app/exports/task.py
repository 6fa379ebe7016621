"""The Ray edge of the runner: a remote task around ``run_export`` (no retries: a lost worker
ends its job as failed through the lease, never as a silent second run)."""

from __future__ import annotations

from typing import Any

import ray

from serve_app.exports.runner import run_export


@ray.remote(max_retries=0)
def export_task(spec: dict[str, Any]) -> str:
    """Run one export on a Ray worker; ``spec`` holds run_export's arguments."""
    args = dict(spec)
    return run_export(args.pop("dsn"), **args)


def submit_export(dsn: str, *, job_id: str, num_cpus: float, **kw: Any) -> ray.ObjectRef[str]:
    """Launch the task on ``num_cpus`` (Settings.export_task_num_cpus) without waiting; the ref serves cancellation."""
    spec = {"dsn": dsn, "job_id": job_id, **kw}
    return export_task.options(num_cpus=num_cpus, name=f"export-{job_id[:8]}").remote(spec)
