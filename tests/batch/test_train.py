"""Fine-tuning on Ray Train: a tiny model end to end, checkpoints per epoch, and a killed job resumed."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batch.train import fit, trained_card, write_model
from batch.train_data import read_manifest, render_demo_set
from batch.training import TRAINING_ALLOCATOR_ENV, TrainConfig, build_trainee
from serve_app.reid.embedder import Embedder, ModelSpec
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight synthetic individuals, six frames each (their own seed: not the demo fixture's deer)."""
    out = tmp_path_factory.mktemp("train-set")
    render_demo_set(out, seed=4242, individuals=8, per_individual=6, workers=2)
    return out


def tiny_config(data: Path, **overrides: object) -> TrainConfig:
    base: dict[str, object] = {
        "data": str(data),
        "input_size_px": 64,
        "embedding_dim": 32,
        "epochs": 2,
        "batch_size": 8,
        "max_steps_per_epoch": 2,
        "val_fraction": 0.5,
    }
    return TrainConfig(**{**base, **overrides})  # type: ignore[arg-type]


def test_tiny_model_trains_end_to_end_and_serves_from_its_file(
    ray_session: None, tiny_set: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_set)
    state, metrics, run = fit(
        config,
        workers=1,
        gpu=False,
        storage=tmp_path / "runs",
        name=None,
        max_failures=1,
        cpus_per_worker=1,
        placement_strategy="PACK",
    )
    assert state["epoch"] == 2 and metrics["epoch"] == 2
    assert metrics["allocator_env"] == TRAINING_ALLOCATOR_ENV  # the CPU worker started with the training allocator
    assert 0.0 <= metrics["top1_known"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "runs" / run).glob("checkpoint_*"))  # checkpoints on storage
    path, card = write_model(config, state, metrics, out=tmp_path / "models", run=run)
    assert card["version"].startswith("mobilenet_v2-") and card["version"].endswith("-64")
    assert card["parent_version"] == "mobilenet_v2-2f518e773d44-64"
    assert card["training"]["data"]["samples"] == len(read_manifest(tiny_set))
    assert card["validation"]["top1_known"] == metrics["top1_known"]
    saved = json.loads((tmp_path / "models" / f"{card['version']}.card.json").read_text())
    assert saved["weights_sha256"] == card["weights_sha256"]
    assert "top-1 on known individuals" in (tmp_path / "models" / f"{card['version']}.card.md").read_text()
    assert trained_card(tmp_path / "models", run) == saved  # what `make run --reuse` finds
    assert trained_card(tmp_path / "models", "another-run") is None
    # Fine-tuning again from this file starts from its backbone with a new head (no nesting).
    again = build_trainee(dataclasses.replace(config, weights=str(path)), classes=3)
    assert not any(k.startswith("backbone.backbone.") for k in again.net.state_dict())
    embedder = Embedder(ModelSpec("mobilenet_v2", str(path), input_size_px=64))
    assert embedder.model_version == card["version"] and embedder.embedding_dim == 32
    vectors = embedder.embed_crops([__import__("PIL.Image").Image.new("RGB", (50, 40), (90, 60, 30))])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def _train_command(data: Path, tmp: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batch.train",
        "--data",
        str(data),
        "--storage",
        str(tmp / "runs"),
        "--out",
        str(tmp / "models"),
        "--name",
        "resume-test",
        "--input-size",
        "64",
        "--embedding-dim",
        "32",
        "--batch-size",
        "8",
        "--max-steps-per-epoch",
        "2",
        "--epochs",
        str(epochs),
        "--cpus-per-worker",
        "1",
    ]


@pytest.mark.slow
def test_a_killed_training_job_resumes_from_its_last_checkpoint(tiny_set: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    first = subprocess.Popen(
        _train_command(tiny_set, tmp_path, epochs=60),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run = tmp_path / "runs" / "resume-test"
        # A new run restores from the snapshot the controller writes after it registered a checkpoint.
        wait_until(
            lambda: any(run.glob("checkpoint_*")) and (run / "checkpoint_manager_snapshot.json").is_file(),
            what="a first recorded checkpoint",
            timeout_s=240,
            every_s=0.2,
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait(timeout=30)
    second = subprocess.run(
        _train_command(tiny_set, tmp_path, epochs=3), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr  # Ray Train workers' prints reach the driver on stderr
    resumed = [line for line in output.splitlines() if "resumed from the checkpoint of epoch" in line]
    assert resumed, output[-3000:]
    epoch = int(resumed[0].rsplit(" ", 1)[1])
    assert epoch >= 1
    card = json.loads(next((tmp_path / "models").glob("*.card.json")).read_text())
    assert card["training"]["epochs"] == max(epoch, 3)
