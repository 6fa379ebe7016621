"""Training samples/s through Ray Train vs a plain single-process PyTorch loop, same model, data and batch size.

Both run the project's own training step (``batch.training``: the pretrained backbone with its embedding
and ArcFace heads, the trail-camera augmentations, AdamW) over the same rendered training set; each is timed
over its steps after one warm-up step, excluding start-up (Ray Train's worker start, the data load).
``--quick`` (or BENCH_QUICK=1): fewer steps at 96 px.

Both loops run under the allocator settings ``batch.train`` gives its workers
(``batch.training.TRAINING_ALLOCATOR_ENV``): the bench starts itself again with them when its own environment
lacks them, so the ratio is Ray Train's cost, not glibc's. ``--glibc-defaults`` measures both under glibc's
defaults instead (the Ray Train worker then keeps ``cluster/local/ray.env``'s ``MALLOC_ARENA_MAX=2``).

``--gpu`` instead measures ``python -m batch.train --gpu``'s own loop (``batch.train.fit``: one Ray Train worker
holding one GPU, NCCL, bfloat16 autocast): the samples/s its last epoch reports (validation and checkpoints
are not timed; the first epoch also pays for CUDA's start-up). ``--fit`` does the same on the CPU (gloo).
benchmarks/gpu_check.sh runs it that way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from batch.train_data import read_manifest, render_demo_set, split
from batch.training import (
    TRAINING_ALLOCATOR_ENV,
    TrainConfig,
    allocator_env_seen,
    build_trainee,
    loader,
    optimizer_for,
    training_set,
)
from benchmarks.common import ray_env, write_results


def _timed_steps(config: TrainConfig, *, steps: int, threads: int) -> float:
    """Samples/s of ``steps`` training steps after one warm-up step, in this process."""
    torch.set_num_threads(threads)
    root = Path(config.data)
    samples = read_manifest(root)
    parts = split(samples, seed=config.seed, val_fraction=config.val_fraction)
    dataset, names = training_set(root, samples, parts, config.input_size_px)
    trainee = build_trainee(config, len(names))
    model: Any = trainee
    try:
        import ray.train.torch

        if ray.train.get_context() is not None:
            model = ray.train.torch.prepare_model(trainee)
    except (ImportError, RuntimeError):
        pass
    optimizer = optimizer_for(model, config)
    model.train()
    batches = iter(loader(dataset, config, epoch=0))
    done, started = 0, 0.0
    for step in range(steps + 1):
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader(dataset, config, epoch=step))
            images, labels = next(batches)
        loss = model(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            started = time.perf_counter()
        else:
            done += len(labels)
    return done / (time.perf_counter() - started)


def _ray_train_worker(params: dict[str, Any]) -> dict[str, Any]:
    rate = _timed_steps(TrainConfig(**params["config"]), steps=params["steps"], threads=params["threads"])
    return {"rate": rate, "allocator_env": allocator_env_seen()}


def through_ray_train(
    config: TrainConfig, *, steps: int, threads: int, storage: Path, allocator: dict[str, str]
) -> float:
    """The same steps inside one Ray Train worker (TorchTrainer, gloo)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import RunConfig

    # The environment make run's head has (cluster/local/ray.env): without it Ray starts the training worker
    # at niceness 15, below its own daemons, which on two cores costs it a third of its steps. The allocator
    # settings this process was started with are taken out first: Ray's processes get ray.env's, and the
    # worker gets ``allocator`` only through its runtime environment, as batch.train gives it.
    for name in TRAINING_ALLOCATOR_ENV:
        os.environ.pop(name, None)
    os.environ.update({k: v for k, v in ray_env().items() if k not in os.environ})
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        worker: Any = _ray_train_worker  # Train V2 returns the worker's value (its stubs say None)
        # Train V2's RunConfig; TorchTrainer's annotations name V1's.
        run_config: Any = RunConfig(name="bench-train", storage_path=str(storage),
                                    worker_runtime_env={"env_vars": allocator})  # fmt: skip
        trainer = TorchTrainer(
            worker,
            train_loop_config={"config": config.as_json(), "steps": steps, "threads": threads},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=run_config,
        )
        result: Any = trainer.fit()  # Train V2: the rank-0 worker's return value is on the result
        seen = result.return_value["allocator_env"]
        if allocator and seen != allocator:
            raise RuntimeError(f"the Ray Train worker started with {seen}, not {allocator}")
        return float(result.return_value["rate"])
    finally:
        ray.shutdown()


def through_train_fit(config: TrainConfig, *, gpu: bool, threads: int, storage: Path) -> dict[str, Any]:
    """batch.train's own training run (fit) on a local Ray: the last epoch's metrics."""
    import ray

    from batch.train import fit

    os.environ.update({k: v for k, v in ray_env().items() if k not in os.environ})  # as make run's head has it
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        _state, metrics, _run = fit(
            config,
            workers=1,
            gpu=gpu,
            storage=storage,
            name=None,
            max_failures=0,
            cpus_per_worker=threads,
            placement_strategy="PACK",
        )
        return metrics
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Render a training set, time both loops, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in both loops")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain / Ray Train rounds")
    parser.add_argument("--gpu", action="store_true", help="batch.train's own loop on one GPU worker (no plain loop)")
    parser.add_argument("--fit", action="store_true", help="batch.train's own loop on the CPU (as --gpu, without)")
    parser.add_argument("--epochs", type=int, default=3, help="--gpu/--fit: epochs (the last one is reported)")
    parser.add_argument("--individuals", type=int, default=16, help="deer in the rendered training set")
    parser.add_argument("--per-individual", type=int, default=12, help="crops of each deer")
    parser.add_argument("--results-name", default="train", help="benchmarks/results/<name>.json")
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="both loops under glibc's allocator defaults, not batch.train's worker settings",
    )
    args = parser.parse_args(argv)
    if (args.gpu or args.fit) and args.glibc_defaults:
        parser.error("--glibc-defaults compares the two loops; --gpu and --fit measure batch.train's own")
    if not (args.gpu or args.fit or args.glibc_defaults) and any(
        os.environ.get(k) != v for k, v in TRAINING_ALLOCATOR_ENV.items()
    ):
        # glibc reads these when a process starts: the plain loop gets them by starting this bench again.
        argv = sys.argv[1:] if argv is None else argv
        os.execve(
            sys.executable,
            [sys.executable, "-m", "benchmarks.bench_train", *argv],
            {**os.environ, **TRAINING_ALLOCATOR_ENV},
        )
    allocator = {} if args.glibc_defaults else TRAINING_ALLOCATOR_ENV
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    size, steps = (96, 6) if args.quick else (128, 20)
    threads = args.threads
    if args.gpu or args.fit:
        fit_main(args, size=size, threads=threads)
        return
    ratios, plain_rates, ray_rates = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train"
        render_demo_set(data, seed=5150, individuals=args.individuals, per_individual=args.per_individual)
        config = TrainConfig(data=str(data), input_size_px=size, batch_size=args.batch_size, val_fraction=0.25)
        # Alternating rounds, the ratio taken per round: a shared 2-core VM drifts by tens of percent
        # within minutes, so each Ray Train figure is paired with a plain one measured just before it.
        for k in range(args.rounds):
            plain_rates.append(_timed_steps(config, steps=steps, threads=threads))
            storage = Path(tmp) / f"round{k}"
            ray_rates.append(
                through_ray_train(
                    dataclasses.replace(config), steps=steps, threads=threads, storage=storage, allocator=allocator
                )
            )
            ratios.append(ray_rates[-1] / plain_rates[-1])
    plain, ray_rate = statistics.median(plain_rates), statistics.median(ray_rates)
    glibc = "glibc defaults" if args.glibc_defaults else "batch.train's allocator settings"
    case = f"{config.architecture} {size}px batch {args.batch_size}, {steps} steps, {threads} threads, {glibc}"
    per_round = ", ".join(f"{r:.2f}" for r in ratios)
    rows: list[dict[str, Any]] = [
        {"case": f"Ray Train, one worker ({case}; median)", "metric": "samples/s", "value": ray_rate,
         "unit": "samples/s"},
        {"case": f"plain PyTorch loop ({case}; median)", "metric": "samples/s", "value": plain, "unit": "samples/s"},
        {"case": f"Ray Train / plain loop (median of {args.rounds} rounds: {per_round})", "metric": "ratio",
         "value": statistics.median(ratios), "unit": "x", "target": ">= 0.8"},
    ]  # fmt: skip
    meta = {"quick": args.quick, "cpus": threads, "cuda": torch.cuda.is_available(), "allocator": allocator}
    write_results(args.results_name, rows, meta=meta)


def fit_main(args: argparse.Namespace, *, size: int, threads: int) -> None:
    """--gpu / --fit: batch.train's own loop; its last epoch's samples/s."""
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: torch.cuda.is_available() is False here (use --fit for the same loop on the CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train"
        render_demo_set(data, seed=5150, individuals=args.individuals, per_individual=args.per_individual)
        config = TrainConfig(data=str(data), input_size_px=size, batch_size=args.batch_size, val_fraction=0.25,
                             epochs=args.epochs)  # fmt: skip
        metrics = through_train_fit(config, gpu=args.gpu, threads=threads, storage=Path(tmp) / "runs")
    where = "one GPU worker" if args.gpu else f"one CPU worker, {threads} threads"
    loop = "python -m batch.train --gpu" if args.gpu else "python -m batch.train"
    case = f"{loop} ({config.architecture} {size}px batch {args.batch_size}, {where})"
    rows: list[dict[str, Any]] = [
        {"case": f"{case}, epoch {metrics['epoch']} of {args.epochs}", "metric": "samples/s",
         "value": float(metrics["samples_per_s"]), "unit": "samples/s"},
    ]  # fmt: skip
    meta = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": threads,
        "samples": args.individuals * args.per_individual,
        "last_epoch": {k: v for k, v in metrics.items() if k != "validation"},
    }
    write_results(args.results_name, rows, meta=meta)


if __name__ == "__main__":
    main()
