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

import psycopg
import ray

from batch import runs
from batch.runs import BackfillOptions, RunLocked, Selection
from serve_app.config import Settings, get_settings
from serve_app.reid.model_spec import RANDOM_WEIGHTS, model_version_for, weights_digest
from serve_app.store.db import connect

logger = logging.getLogger("batch.backfill")

ROOT = Path(__file__).resolve().parents[1]
PROGRESS_INTERVAL_S = 10.0


@dataclass
class RunResult:
    """What a run did (also the CLI's summary)."""

    run_id: uuid.UUID | None
    model_version: str
    state: str
    total: int
    detections: int = 0
    score_rows: int = 0
    failed: int = 0
    reassigned: int = 0
    elapsed_s: float = 0.0
    error: str | None = None
    dry_run: dict[str, Any] = field(default_factory=dict)

    @property
    def detections_per_s(self) -> float:
        """End-to-end throughput."""
        return self.detections / self.elapsed_s if self.elapsed_s > 0 else 0.0


def model_version(options: BackfillOptions) -> str:
    """The version string the embedder will report, computed without loading the model."""
    digest = None if options.spec.random_weights else weights_digest(Path(options.weights))
    return model_version_for(options.spec, digest=digest)


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
    """Run (or resume: ``options`` then come from the run's row) a backfill and return its summary.

    A dry run reads and computes only: no row, lock, counter or embedding is written, resume included.
    """
    from batch import pipeline  # Ray Data is imported only by runs that use it

    dsn = settings.database_dsn
    image_root = Path(settings.image_root).resolve()  # tasks on other nodes need an absolute path
    with connect(dsn) as conn:
        stored_ids: tuple[int, int] | None = None
        if resume is not None:
            row = runs.load_run(conn, resume)
            if row is None:
                raise ValueError(f"no backfill run {resume}")
            options = BackfillOptions.from_json(dict(row["parameters"]))
            stored_ids = (int(row["parameters"]["id_min"]), int(row["parameters"]["id_max"]))
            if not dry_run and not runs.try_lock_run(conn, resume):
                raise RunLocked(f"backfill run {resume} is being resumed by another driver; nothing was changed")
        if options is None:
            raise ValueError("a new run needs options")
        version = model_version(options)
        # A resume (dry or not) reads only the run's detections that have no rows yet.
        selection = Selection(version, resume, options.mode, options.sites, options.since, options.until,
                              *(stored_ids or (0, runs.MAX_ID)))  # fmt: skip
        lo, hi, count = runs.bounds(conn, selection, limit=options.limit if resume is None else None)
        run_id = None if dry_run else (resume or uuid.uuid4())
        selection = dataclasses.replace(selection, run_id=resume or run_id, id_min=lo, id_max=hi)
        sites = runs.selection_sites(conn, selection) if count else []
        if run_id is not None and resume is None:
            runs.create_run(
                conn,
                run_id=run_id,
                model_version=version,
                parameters={**options.as_json(), "id_min": lo, "id_max": hi, "image_root": str(image_root)},
                total=count,
            )
            runs.try_lock_run(conn, run_id)
        elif run_id is not None:
            runs.mark_resumed(conn, run_id)
        if options.spec.random_weights:
            logger.warning("model %s has RANDOM weights: its scores carry no identity information", version)
        logger.info(
            "backfill %s: model %s, %d detections to score in sites %s%s",
            run_id or "(dry run)", version, count, sites, f"; resume with --resume {run_id}" if run_id else "",
        )  # fmt: skip
        result = RunResult(run_id, version, "completed", count)
        start = time.monotonic()
        ranges = runs.id_ranges(lo, hi, total=count, rows_per_block=options.rows_per_block)
        progress = Progress(dsn, run_id, interval_s=progress_interval_s) if run_id else None
        try:
            if ranges:
                ensure_ray()
                ds = pipeline.build_dataset(
                    dsn=dsn, selection=selection, ranges=ranges, options=options, image_root=image_root,
                    sites=sites, store_galleries=not dry_run, actors=actors, cpu_threads=cpu_threads,
                )  # fmt: skip
                if progress:
                    progress.start()
                if run_id is None:
                    dry = pipeline.DryRunSink(model_version=version, options=options)
                    ds.write_datasink(dry, ray_remote_args={"num_cpus": pipeline.WRITE_CPUS})
                    result.dry_run = dry.summary
                    result.detections, result.score_rows = dry.summary["detections"], dry.summary["score_rows"]
                    result.failed = dry.summary["failed"]
                else:
                    sink = pipeline.ScoreSink(dsn=dsn, run_id=run_id, model_version=version, options=options)
                    ds.write_datasink(sink, ray_remote_args={"num_cpus": pipeline.WRITE_CPUS})
                    counts = sink.counts
                    result.detections, result.score_rows = counts.detections, counts.score_rows
                    result.failed, result.reassigned = counts.failed, counts.reassigned
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


def outcome(conn: psycopg.Connection[Any], result: RunResult) -> tuple[str, str | None]:
    """Final state and reason: a run none of whose detections could be scored failed, it did not complete."""
    scored = result.detections
    if result.run_id is not None:
        row = runs.load_run(conn, result.run_id)
        scored = int(row["done"]) if row else scored  # a resumed run counts what its earlier passes scored
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
    parser.add_argument("--model", default="resnet50", help="ARCH or ARCH:WEIGHTS (weights: 'random' or a local file)")
    parser.add_argument("--seed", type=int, default=7, help="seed of random weights")
    parser.add_argument("--input-size-px", type=int, default=224)
    parser.add_argument("--mode", choices=["missing", "all"], default="missing")
    parser.add_argument("--decode", choices=["exact", "draft"], default="exact", help="draft: faster JPEG decode")
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
    """Options from parsed arguments."""
    architecture, _, weights = args.model.partition(":")
    return BackfillOptions(
        architecture=architecture,
        weights=weights or RANDOM_WEIGHTS,
        seed=args.seed,
        input_size_px=args.input_size_px,
        batch_size=args.batch_size,
        sites=tuple(args.sites) if args.sites else None,
        since=args.since,
        until=args.until,
        limit=args.limit,
        mode=args.mode,
        decode=args.decode,
        accept_threshold=args.accept_threshold,
        review_threshold=args.review_threshold,
        store_embeddings=args.store_embeddings,
        apply_assignments=args.apply_assignments,
        rows_per_block=args.rows_per_block,
    )


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
