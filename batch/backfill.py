"""Score every stored detection against its site's profiles with a Ray Data pipeline.

Submit to a cluster (the working dir is uploaded; .gitignore/.rayignore keep .venv and .data out)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m batch.backfill --limit 1000

or run ``python -m batch.backfill`` against a local Ray (started for the run when RAY_ADDRESS is unset).
One backfill_runs row per run; ``--resume RUN_ID`` continues an interrupted run without duplicate
or missing score rows. Decisions a person made are never touched; a dry run writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from batch import runs
from batch.runs import BackfillOptions, RunLocked, Selection
from batch.score_writer import BlockCounts
from serve_app.config import Settings, get_settings
from serve_app.reid.model_spec import RANDOM_WEIGHTS, TIMM_PREFIX, model_version_for, spec_weights_digest
from serve_app.store.db import SyncConn, connect

logger = logging.getLogger("batch.backfill")

ROOT = Path(__file__).resolve().parents[1]
PROGRESS_INTERVAL_S = 10.0


@dataclass(kw_only=True)
class RunResult(BlockCounts):
    """What a run did: its blocks' summed counts and how it ended (also the CLI's summary)."""

    run_id: uuid.UUID | None
    model_version: str
    state: str
    total: int
    elapsed_s: float = 0.0
    error: str | None = None
    dry_run: dict[str, Any] = field(default_factory=dict)

    @property
    def detections_per_s(self) -> float:
        """End-to-end throughput."""
        return self.detections / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class Plan:
    """What a run is to do, read before anything runs or is written: the selection is fixed here, once."""

    dsn: str
    image_root: Path
    options: BackfillOptions
    selection: Selection
    """Filters, model version and id bounds; its run_id is the run whose rows are skipped (None: none)."""
    run_id: uuid.UUID | None
    """The run that writes (new or resumed); None: a dry run, which writes nothing."""
    resumed: bool
    total: int
    sites: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    """Contiguous id ranges of about ``options.rows_per_block`` detections: one read task each."""

    @property
    def model_version(self) -> str:
        """The version string the run's scores carry."""
        return self.selection.model_version


def model_version(options: BackfillOptions) -> str:
    """The version string the embedder will report, computed without loading the model."""
    return model_version_for(options.spec, digest=spec_weights_digest(options.spec))


def ensure_ray() -> None:
    """Connect to RAY_ADDRESS (set by ``ray job submit``) or start a local Ray whose workers import this checkout."""
    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ray.init(configure_logging=False)


class Progress(threading.Thread):
    """Logs rows done, detections/s and ETA from the run's row while the pipeline runs."""

    def __init__(self, dsn: str, run_id: uuid.UUID, *, interval_s: float) -> None:
        super().__init__(name="backfill-progress", daemon=True)
        self.dsn, self.run_id, self.interval_s = dsn, run_id, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        first: int | None = None
        while not self.stopped.wait(self.interval_s):
            try:
                with connect(self.dsn, autocommit=True) as conn:
                    row = runs.load_run(conn, self.run_id)
            except Exception as exc:  # noqa: BLE001 - progress must never stop a run
                logger.warning("progress unavailable: %s", exc)
                continue
            if row is None:
                continue
            done, total = int(row["done"]) + int(row["failed"]), int(row["total"] or 0)
            first = done if first is None else first
            rate = (done - first) / max(1e-9, time.monotonic() - start)
            eta = (total - done) / rate if rate > 0 else float("inf")
            logger.info(
                "backfill %s: %d/%d detections (%.1f%%), %d score rows, %.1f detections/s, ETA %s",
                self.run_id, done, total, 100.0 * done / max(1, total), row["score_rows"], rate,
                "?" if eta == float("inf") else f"{eta:.0f} s",
            )  # fmt: skip


def plan(
    conn: SyncConn,
    options: BackfillOptions | None,
    *,
    settings: Settings,
    dry_run: bool = False,
    resume: uuid.UUID | None = None,
) -> Plan:
    """Read what a run (or a resume: ``options`` then come from the run's row) is to do; writes nothing.

    A non-dry resume is planned on the connection that holds the run's lock (``hold``), so the selection is
    read once, while no other driver writes to the run.
    """
    ids = (0, runs.MAX_ID)
    if resume is not None:
        row = runs.load_run(conn, resume)
        if row is None:
            raise ValueError(f"no backfill run {resume}")
        options = BackfillOptions.from_json(dict(row["parameters"]))
        ids = (int(row["parameters"]["id_min"]), int(row["parameters"]["id_max"]))
    if options is None:
        raise ValueError("a new run needs options")
    run_id = None if dry_run else (resume or uuid.uuid4())
    # A resume (dry or not) reads only the run's detections that have no rows yet; a new run has none.
    # What this run already wrote is what was computed before now (the database's clock): a range then reads the
    # same rows however often Ray runs its task.
    selection = Selection(model_version(options), resume, options.mode, options.sites, options.since,
                          options.until, *ids, scored_before=runs.database_now(conn))  # fmt: skip
    lo, hi, total = runs.bounds(conn, selection, limit=options.limit if resume is None else None)
    # The read tasks skip what this run already wrote; a --limit run's sites are its own.
    selection = dataclasses.replace(selection, run_id=run_id or resume, id_min=lo, id_max=hi)
    sites = runs.selection_sites(conn, selection) if total else []
    return Plan(
        dsn=settings.database_dsn,
        image_root=Path(settings.image_root).resolve(),  # tasks on other nodes need an absolute path
        options=options,
        selection=selection,
        run_id=run_id,
        resumed=resume is not None,
        total=total,
        sites=tuple(sites),
        ranges=tuple(runs.id_ranges(lo, hi, total=total, rows_per_block=options.rows_per_block)),
    )


def require_gpus(options: BackfillOptions) -> None:
    """``--decode gpu`` needs GPUs for the embedding actors: refuse it (ValueError) on a cluster without any,
    before a row is written."""
    if options.decode != "gpu":
        return
    ensure_ray()
    if not ray.cluster_resources().get("GPU", 0):  # type: ignore[no-untyped-call]
        raise ValueError(
            "--decode gpu decodes the images on the embedding actors' GPUs (nvJPEG), and this Ray cluster has no"
            " GPU: use --decode exact or draft, or run on a cluster with GPU workers; nothing was written"
        )


def hold(conn: SyncConn, run_id: uuid.UUID) -> None:
    """Take the run's lock for this driver's session before anything is read, or refuse (RunLocked)."""
    if not runs.try_lock_run(conn, run_id):
        raise RunLocked(f"backfill run {run_id} is being resumed by another driver; nothing was changed")


def claim(conn: SyncConn, plan: Plan, run_id: uuid.UUID) -> None:
    """Hold the run for this driver: a new run's row and lock, or a resumed run's recounted row (its lock is
    already held on ``conn``: ``hold``)."""
    if plan.resumed:
        runs.mark_resumed(conn, run_id)
        return
    parameters = {**plan.options.as_json(), "id_min": plan.selection.id_min, "id_max": plan.selection.id_max,
                  "image_root": str(plan.image_root)}  # fmt: skip
    runs.create_run(conn, run_id=run_id, model_version=plan.model_version, parameters=parameters, total=plan.total)
    runs.try_lock_run(conn, run_id)


def score(plan: Plan, *, actors: int | None, cpu_threads: int) -> tuple[BlockCounts, dict[str, Any]]:
    """Run the Ray Data pipeline into the run's sink: what it wrote (or, dry, would write) and the dry summary."""
    from batch import pipeline, tasks  # Ray Data is imported only by runs that use it

    ensure_ray()
    ds = pipeline.build_dataset(
        dsn=plan.dsn, selection=plan.selection, ranges=list(plan.ranges), options=plan.options,
        image_root=plan.image_root, sites=list(plan.sites), store_galleries=plan.run_id is not None, actors=actors,
        cpu_threads=cpu_threads,
    )  # fmt: skip
    remote_args = {"num_cpus": pipeline.WRITE_CPUS}
    if plan.run_id is None:
        dry = tasks.DryRunSink(model_version=plan.model_version, options=plan.options)
        ds.write_datasink(dry, ray_remote_args=remote_args)
        summary = dry.summary
        return BlockCounts(summary["detections"], summary["score_rows"], summary["failed"]), summary
    sink = tasks.ScoreSink(dsn=plan.dsn, run_id=plan.run_id, model_version=plan.model_version, options=plan.options)
    ds.write_datasink(sink, ray_remote_args=remote_args)
    return sink.counts, {}


def execute(
    conn: SyncConn,
    plan: Plan,
    *,
    actors: int | None = None,
    cpu_threads: int = 0,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
) -> RunResult:
    """Claim the run, score its ranges and record how it ended (a dry run only computes); ``conn`` is the one
    the plan was read on (for a resume, the one holding the run's lock)."""
    run_id = plan.run_id
    if plan.ranges:
        require_gpus(plan.options)
    if run_id is not None:
        claim(conn, plan, run_id)
    if plan.options.spec.random_weights:
        logger.warning("model %s has RANDOM weights: its scores carry no identity information", plan.model_version)
    logger.info(
        "backfill %s: model %s, %d detections to score in sites %s%s", run_id or "(dry run)", plan.model_version,
        plan.total, list(plan.sites), f"; resume with --resume {run_id}" if run_id else "",
    )  # fmt: skip
    result = RunResult(run_id=run_id, model_version=plan.model_version, state="completed", total=plan.total)
    start = time.monotonic()
    progress = Progress(plan.dsn, run_id, interval_s=progress_interval_s) if run_id and plan.ranges else None
    if progress:
        progress.start()
    try:
        if plan.ranges:
            counts, result.dry_run = score(plan, actors=actors, cpu_threads=cpu_threads)
            result.add(counts)
    except BaseException as exc:
        result.state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        if run_id is not None:
            runs.finish_run(conn, run_id, state=result.state, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    finally:
        if progress:
            progress.stopped.set()
    result.elapsed_s = time.monotonic() - start
    result.state, result.error = outcome(conn, result)
    if run_id is not None:
        runs.finish_run(conn, run_id, state=result.state, error=result.error)
    return result


def run_backfill(
    options: BackfillOptions | None,
    *,
    settings: Settings,
    dry_run: bool = False,
    resume: uuid.UUID | None = None,
    actors: int | None = None,
    cpu_threads: int = 0,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
) -> RunResult:
    """Plan and execute a run (or a resume) and return its summary.

    A dry run reads and computes only: no row, lock, counter or embedding is written, resume included.
    """
    with connect(settings.database_dsn) as conn:
        if resume is not None and not dry_run:
            hold(conn, resume)
        planned = plan(conn, options, settings=settings, dry_run=dry_run, resume=resume)
        return execute(conn, planned, actors=actors, cpu_threads=cpu_threads, progress_interval_s=progress_interval_s)


def outcome(conn: SyncConn, result: RunResult) -> tuple[str, str | None]:
    """Final state and reason: a run none of whose detections could be scored failed, it did not complete."""
    scored = result.detections
    if result.run_id is not None:
        row = runs.load_run(conn, result.run_id)
        if row is None:  # this driver inserted (or loaded) the row and holds its lock; nothing deletes runs
            raise RuntimeError(f"backfill run {result.run_id} disappeared while it ran")
        scored = int(row["done"])  # a resumed run counts what its earlier passes scored too
    if result.failed and not scored:
        return "failed", (
            f"no detection could be scored: {result.failed} images unreadable (see the 'not scored' log lines;"
            " the image root must be an absolute path to the images on every node)"
        )
    return "completed", None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CLI."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="score at most this many detections (lowest ids first)")
    parser.add_argument("--batch-size", type=int, default=64, help="crops per model forward pass")
    parser.add_argument("--site", type=int, action="append", dest="sites", help="site id (repeatable)")
    parser.add_argument("--since", help="images captured at or after (ISO 8601, UTC when no offset)")
    parser.add_argument("--until", help="images captured before (ISO 8601)")
    parser.add_argument(
        "--model",
        default="mobilenet_v2:imagenet",
        help="ARCH:WEIGHTS (ARCH: a torchvision name or timm:<name>; WEIGHTS: imagenet, a local file, or random"
        " for tests; see docs/models.md)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of random weights")
    parser.add_argument("--input-size-px", type=int, default=128, help="the served model's (serve_config.yaml: 128)")
    parser.add_argument("--mode", choices=["missing", "all"], default="missing")
    parser.add_argument(
        "--decode",
        choices=["exact", "draft", "gpu"],
        default="exact",
        help="draft: faster JPEG decode on the CPUs; gpu: the embedding actors decode and crop on their GPU (nvJPEG)",
    )
    parser.add_argument("--accept-threshold", type=float, default=BackfillOptions.accept_threshold)
    parser.add_argument("--review-threshold", type=float)
    parser.add_argument("--store-embeddings", action="store_true", help="also store embeddings on the detections")
    parser.add_argument("--apply-assignments", action="store_true", help="re-decide automatic assignments")
    parser.add_argument("--dry-run", action="store_true", help="compute everything, write nothing")
    parser.add_argument("--resume", type=uuid.UUID, metavar="RUN_ID", help="continue an interrupted run")
    parser.add_argument("--actors", type=int, help="embedding actors (default: one per GPU, else 1)")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads per CPU actor (default: all cores)")
    parser.add_argument("--rows-per-block", type=int, default=256, help="detections per read task")
    parser.add_argument("--database-url", help="default: TRAILCAM_DATABASE_URL")
    parser.add_argument("--image-root", help="default: TRAILCAM_IMAGE_ROOT")
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> BackfillOptions:
    """Options from parsed arguments (each option's flag carries its name; ``--model`` is ARCH[:WEIGHTS])."""
    prefix = TIMM_PREFIX if args.model.startswith(TIMM_PREFIX) else ""
    architecture, _, weights = args.model[len(prefix) :].partition(":")
    architecture = prefix + architecture
    return BackfillOptions.from_json({**vars(args), "architecture": architecture, "weights": weights or RANDOM_WEIGHTS})


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints a summary; exit 0 when the run completed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop` -> state interrupted, resumable
    overrides = {k: v for k, v in (("database_url", args.database_url), ("image_root", args.image_root)) if v}
    settings = Settings(**overrides) if overrides else get_settings()
    try:
        result = run_backfill(
            options_from_args(args), settings=settings, dry_run=args.dry_run, resume=args.resume,
            actors=args.actors, cpu_threads=args.cpu_threads,
        )  # fmt: skip
    except (ValueError, RunLocked) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run {result.run_id or '(dry run: nothing written)'}: {result.state}, model {result.model_version}")
    print(
        f"detections {result.detections} of {result.total}, score rows {result.score_rows}, failed {result.failed},"
        f" reassigned {result.reassigned}, {result.elapsed_s:.1f} s, {result.detections_per_s:.1f} detections/s"
    )
    if args.dry_run:
        print("decisions: " + json.dumps(result.dry_run.get("decisions", {}), sort_keys=True))
        for sample in result.dry_run.get("sample", []):
            print("sample: " + json.dumps(sample))
    if result.state != "completed":
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
