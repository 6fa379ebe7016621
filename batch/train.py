"""Fine-tune a re-ID model on Ray Train from labelled crops; write the model file and its model card.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m batch.train --data "$PWD/.data/train/demo-seed1001" --out "$PWD/.data/models" \\
            --storage "$PWD/.data/train-runs"

Paths are absolute: a job runs in a copy of the working directory, without ``.data/``.
``--data`` is a training set folder (``python -m batch.train_data``: people's manual assignments, or the
demo generator's own training set). The job runs ``ray.train.torch.TorchTrainer``: data-parallel workers
(gloo on CPU, one GPU each with ``--gpu``), ArcFace metric learning on the pretrained backbone with
trail-camera augmentations, validation on held-out individuals after every epoch (top-1 on known
individuals, strangers left unassigned, the recommended threshold), and a checkpoint per epoch under
``--storage``. A worker that dies, or the node it ran on, restarts the worker group from the last checkpoint
(at most ``--max-failures`` times); the same command run again after the whole job was killed resumes from
it too (the run's name is derived from its configuration; ``--name`` sets it). ``--storage`` must be a path
every node reads and writes: on one machine any local path, on Kubernetes a volume that the head and every
worker pod mount (ReadWriteMany).

Workers go where Ray's placement group puts them: ``--placement-strategy PACK`` (the default, Ray Train's)
fills one node before the next, so the gradients' all-reduce stays within a node when one has room;
``SPREAD`` puts them on different nodes when there are enough (both are soft: after a node is lost, the
restarted workers share the nodes that are left if those have the CPUs).

The result is ``<out>/<version>.safetensors`` (backbone + embedding head, see
``serve_app.reid.backbones``) with ``<version>.card.json`` and ``<version>.card.md`` beside it: data
counts, configuration, validation figures and the recommended accept threshold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from batch.train_data import read_manifest, split
from batch.training import (
    TRAINING_ALLOCATOR_ENV,
    TrainConfig,
    allocator_env_seen,
    build_trainee,
    loader,
    lr_factor,
    optimizer_for,
    summary,
    train_epoch,
    training_set,
    validate,
)
from serve_app.reid.backbones import save_reid_model
from serve_app.reid.model_spec import ModelSpec, model_version_for

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
VALIDATION_FILE = "validation.json"
"""The epoch's whole validation (per-threshold curve included), beside the state in each checkpoint: the
metrics reported to Ray Train stay small (a few numbers and the worker's allocator settings; it logs each
report whole)."""


def _eta(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def train_loop_per_worker(params: dict[str, Any]) -> None:
    """One Ray Train worker: the same model on every worker (DDP), its share of each epoch's batches."""
    import ray.train
    import ray.train.torch

    config = TrainConfig(**params["config"])
    threads = int(params.get("torch_threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    root = Path(config.data)
    samples = read_manifest(root)
    parts = split(samples, seed=config.seed, val_fraction=config.val_fraction)
    dataset, names = training_set(root, samples, parts, config.input_size_px)
    trainee = build_trainee(config, len(names))
    device = ray.train.torch.get_device()
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    resumed: dict[str, Any] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resumed = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        trainee.load_state_dict(resumed["model"])
        start_epoch = int(resumed["epoch"])
    model = ray.train.torch.prepare_model(trainee)
    optimizer = optimizer_for(model, config)
    sampler: torch.utils.data.distributed.DistributedSampler[Any] | None = None
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed, drop_last=True
        )
    steps = len(dataset) // world // config.batch_size
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, max(1, steps * config.epochs), max(1, steps // 2))
    )
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if rank == 0:
            _progress(f"resumed from the checkpoint of epoch {start_epoch}")
    started = time.monotonic()
    for epoch in range(start_epoch, config.epochs):
        # Augmentations differ per worker and per epoch, and an epoch draws the same ones after a resume.
        torch.manual_seed(config.seed * 7919 + rank * 104_729 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        batches = loader(dataset, config, epoch=epoch, sampler=sampler)
        stats = train_epoch(
            model, iter(batches), optimizer, scheduler, device=device, max_steps=config.max_steps_per_epoch
        )
        inner: Any = getattr(model, "module", model)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": stats["loss"],
            "samples_per_s": stats["samples"] * world / max(stats["seconds"], 1e-9),
            "allocator_env": allocator_env_seen(),  # what glibc was started with in this worker
        }
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                validation = validate(inner.net, root, samples, parts, config, device=device)
                metrics.update(summary(validation))
                state = {
                    "model": inner.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "classes": names,
                }
                torch.save(state, Path(folder) / STATE_FILE)
                (Path(folder) / VALIDATION_FILE).write_text(json.dumps(validation))
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
                done = epoch + 1 - start_epoch
                eta = (time.monotonic() - started) / done * (config.epochs - epoch - 1)
                top1 = metrics["top1_known"]
                _progress(
                    f"epoch {epoch + 1}/{config.epochs} loss {stats['loss']:.3f}"
                    f" val top-1 {top1 if top1 is None else f'{top1:.3f}'}"
                    f" threshold {metrics['recommended_threshold']}"
                    f" {metrics['samples_per_s']:.0f} samples/s ETA {_eta(eta)}"
                )
            ray.train.report(metrics, checkpoint=report_checkpoint)


def _progress(line: str) -> None:
    """A progress line from a worker, written to its stdout (Ray forwards it to the driver). Not print():
    Ray Train routes a worker's print() to its logger and also to the redirected stdout: every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_name(config: TrainConfig, data_digest: str, *, workers: int = 1) -> str:
    """A stable name for a configuration, its data and its worker count: the same command resumes the same run
    (another worker count would change the steps per epoch under a restored schedule)."""
    blob = json.dumps({"config": config.as_json(), "data": data_digest, "workers": workers}, sort_keys=True)
    return "train-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def manifest_digest(root: Path) -> str:
    """A digest of the training set's manifest (which crops, which labels)."""
    return hashlib.sha256((root / "manifest.csv").read_bytes()).hexdigest()[:12]


def fit(
    config: TrainConfig,
    *,
    workers: int,
    gpu: bool,
    storage: Path,
    name: str | None,
    max_failures: int,
    cpus_per_worker: float,
    placement_strategy: str,
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Run the trainer; returns the final checkpoint's state, the last epoch's metrics and the run name."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig

    name = name or run_name(config, manifest_digest(Path(config.data)), workers=workers)
    # Train V2's RunConfig (ray.train.RunConfig when V2 is on, the default); TorchTrainer's annotations name V1's.
    run_config: Any = RunConfig(
        name=name,
        storage_path=str(storage.resolve()),
        # Bounded: Ray Train's controller retries forever by default.
        failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        worker_runtime_env={"env_vars": {} if gpu else TRAINING_ALLOCATOR_ENV},
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.as_json(), "torch_threads": max(1, int(cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy=placement_strategy,
        ),
        run_config=run_config,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        validation = Path(folder) / VALIDATION_FILE
        metrics = dict(result.metrics or {})
        if validation.is_file():
            metrics["validation"] = validation.read_text()
    return state, metrics, name


def write_model(
    config: TrainConfig,
    state: dict[str, Any],
    metrics: dict[str, Any],
    *,
    out: Path,
    run: str,
    parent: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The model file and its card (JSON and markdown); returns the model file and the card."""
    trainee = build_trainee(config, len(state["classes"]), pretrained=False)
    trainee.load_state_dict(state["model"])
    samples = read_manifest(Path(config.data))
    parts = split(samples, seed=config.seed, val_fraction=config.val_fraction)
    validation = json.loads(metrics.get("validation", "{}")) if metrics.get("validation") else {}
    extra = {"run": run, "epochs": int(state["epoch"])}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{run}.safetensors"
    digest = save_reid_model(
        trainee.net, tmp, architecture=config.architecture, input_size_px=config.input_size_px, extra=extra
    )
    spec = ModelSpec(config.architecture, str(tmp), input_size_px=config.input_size_px)
    version = model_version_for(spec, digest=digest[:12])
    stem = version.replace(":", "_").replace("/", "_")  # timm:<name> versions; the card keeps the version
    path = out / f"{stem}.safetensors"
    tmp.replace(path)
    card = {
        "version": version,
        "architecture": config.architecture,
        "input_size_px": config.input_size_px,
        "embedding_dim": config.embedding_dim,
        "weights_path": str(path.resolve()),
        "weights_sha256": digest,
        "parent_version": parent
        or model_version_for(
            ModelSpec(config.architecture, config.weights, input_size_px=config.input_size_px),
            digest=_parent_digest(config),
        ),
        "run": run,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training": {
            "config": config.as_json(),
            "data": {
                "samples": len(samples),
                "individuals": len({s.individual for s in samples}),
                "sources": sorted({s.source for s in samples}),
                "manifest_sha256": manifest_digest(Path(config.data)),
                **parts.counts(),
            },
            "epochs": int(state["epoch"]),
        },
        "validation": {k: v for k, v in validation.items() if k != "curve"},
        "validation_curve": validation.get("curve", []),
        "recommended_thresholds": {
            "accept": (validation.get("recommended") or {}).get("threshold"),
            "precision_target": config.precision_target,
        },
    }
    _write_atomically(out / f"{stem}.card.md", card_markdown(card))
    _write_atomically(out / f"{stem}.card.json", json.dumps(card, indent=2) + "\n")  # last: it marks the model done
    return path, card


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def trained_card(out: Path, run: str) -> dict[str, Any] | None:
    """The card of a model that run ``run`` wrote to ``out`` and whose file is still there, if any."""
    for path in sorted(out.glob("*.card.json")):
        card = json.loads(path.read_text())
        if card.get("run") == run and Path(card["weights_path"]).is_file():
            return dict(card)
    return None


def _parent_digest(config: TrainConfig) -> str | None:
    from serve_app.reid.model_spec import spec_weights_digest

    return spec_weights_digest(ModelSpec(config.architecture, config.weights, input_size_px=config.input_size_px))


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def card_markdown(card: dict[str, Any]) -> str:
    """The model card as markdown."""
    v = card["validation"]
    at = v.get("at_recommended") or {}
    data = card["training"]["data"]
    lines = [
        f"# Model card: {card['version']}",
        "",
        f"- architecture: {card['architecture']} at {card['input_size_px']} px, {card['embedding_dim']}-d embeddings",
        f"- fine-tuned from: {card['parent_version']}",
        f"- weights: `{card['weights_path']}` (SHA-256 {card['weights_sha256']})",
        f"- trained: {card['created_at']}, run {card['run']}, {card['training']['epochs']} epochs",
        f"- data: {data['samples']} crops of {data['individuals']} individuals ({', '.join(data['sources'])});"
        f" trained on {data['train']}, validated on {data['known_queries']} known-individual queries against a"
        f" gallery of {data['gallery']} and {data['stranger_queries']} stranger queries",
        "",
        "## Validation (individuals never trained on)",
        "",
        f"- top-1 on known individuals: {_pct(v.get('top1_known'))}",
        f"- recommended accept threshold: {card['recommended_thresholds']['accept']}"
        f" ({v.get('recommended', {}).get('reason', 'no validation figures')})",
        f"- at it: precision {_pct(at.get('precision'))}, known assigned {_pct(at.get('known_assigned'))},"
        f" strangers left unassigned {_pct(at.get('strangers_unassigned'))}, BAKS {_pct(at.get('baks'))},"
        f" BAUS {_pct(at.get('baus'))}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m batch.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="training set folder (python -m batch.train_data)")
    parser.add_argument("--out", type=Path, default=Path(".data/models"), help="where the model file and card go")
    parser.add_argument("--storage", type=Path, default=Path(".data/train-runs"), help="checkpoints (a shared path)")
    parser.add_argument("--name", help="run name (default: derived from the configuration and the data)")
    parser.add_argument("--architecture", default="mobilenet_v2", help="torchvision name or timm:<name>")
    parser.add_argument("--weights", default="imagenet", help="starting weights: imagenet or a local file")
    parser.add_argument("--input-size", type=int, default=128, dest="input_size_px")
    parser.add_argument("--embedding-dim", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps-per-epoch", type=int, default=0, help="0: the whole training split")
    parser.add_argument("--precision-target", type=float, default=0.95)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (data-parallel)")
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        help="default: the cluster's CPUs (at most this machine's cores) shared among the workers",
    )
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument(
        "--placement-strategy",
        choices=("PACK", "SPREAD"),
        default="PACK",
        help="PACK: fill one node first; SPREAD: workers on different nodes when there are enough",
    )
    parser.add_argument("--max-failures", type=int, default=2, help="worker restarts from the last checkpoint")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="Ray cluster (default: RAY_ADDRESS, else a local one)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="when this run already wrote its model to --out, print its card instead of training",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not (args.data / "manifest.csv").is_file():
        print(f"no training set at {args.data}: write one with python -m batch.train_data", file=sys.stderr)
        return 2
    config = TrainConfig(
        data=str(args.data.resolve()),
        architecture=args.architecture,
        weights=args.weights,
        input_size_px=args.input_size_px,
        embedding_dim=args.embedding_dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        precision_target=args.precision_target,
        max_steps_per_epoch=args.max_steps_per_epoch,
    )
    name = args.name or run_name(config, manifest_digest(args.data), workers=args.workers)
    if args.reuse and (done := trained_card(args.out, name)) is not None:
        print(card_markdown(done))
        print(f"model file: {done['weights_path']} (trained before by run {name}; reused)")
        return 0
    import ray

    ray.init(address=args.address, log_to_driver=True)
    cpus = args.cpus_per_worker
    if cpus is None:
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
        available = min(cluster_cpus, float(os.cpu_count() or 1))
        cpus = max(1.0, available // args.workers)
    from ray.train.v2.api.exceptions import TrainingFailedError

    try:
        state, metrics, run = fit(
            config,
            workers=args.workers,
            gpu=args.gpu,
            storage=args.storage,
            name=name,
            max_failures=args.max_failures,
            cpus_per_worker=cpus,
            placement_strategy=args.placement_strategy,
        )
    except TrainingFailedError as exc:
        run_dir = args.storage.resolve() / name
        kept = (
            f"its checkpoints stay under {run_dir}: the same command resumes from the last one"
            if any(run_dir.glob("checkpoint_*"))
            else "it wrote no checkpoint: the same command starts it again"
        )
        print(f"{exc}\ntraining run {name} failed (restarts allowed: --max-failures {args.max_failures}); {kept}",
              file=sys.stderr)  # fmt: skip
        return 1
    path, card = write_model(config, state, metrics, out=args.out, run=run)
    print(card_markdown(card))
    print(f"model file: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
