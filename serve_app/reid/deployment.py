"""The ReID Serve deployment: batched identification on CPU or GPU replicas (a thin edge over Identifier).

Thresholds arrive through ``user_config`` and change at run time via ``reconfigure``; batch size, model
and score-log tuning come from the builder args (``reid`` in serve_config.yaml).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from serve_app.config import Settings
from serve_app.diagnostics import MemoryProbe
from serve_app.errors import ImageConflict
from serve_app.reid import metrics
from serve_app.reid.decision import DEFAULT_ACCEPT_THRESHOLD, Thresholds
from serve_app.reid.embedder import Embedder, ModelSpec
from serve_app.reid.handle import DEPLOYMENT_NAME
from serve_app.reid.identification import Identification, IdentifyRequest
from serve_app.reid.identifier import Identifier, IdentifierOptions
from serve_app.reid.model_spec import RANDOM_WEIGHTS
from serve_app.reid.score_buffer import BufferLimits, ScoreBuffer
from serve_app.store.db import make_pool

logger = logging.getLogger(__name__)

MAX_ONGOING_REQUESTS = 64
"""Requests a replica holds at once unless the args say otherwise (>= the batch size, so batches fill)."""
MAX_BATCH_SIZE = 32
"""Crops per forward pass unless the args or user_config say otherwise."""
BATCH_WAIT_TIMEOUT_S = 0.05
"""How long a replica waits to fill a batch unless the args or user_config say otherwise, seconds."""


class ReIDUserConfig(BaseModel):
    """Run-time settings applied by ``reconfigure`` without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    accept_threshold: float = Field(default=DEFAULT_ACCEPT_THRESHOLD, ge=-1, le=1)
    review_threshold: float | None = Field(default=None, ge=-1, le=1, description="None: no review band.")
    max_batch_size: int | None = Field(default=None, ge=1, description="Overrides the batch size when set.")
    batch_wait_timeout_s: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _band(self) -> ReIDUserConfig:
        Thresholds(self.accept_threshold, self.review_threshold)
        return self

    def thresholds(self) -> Thresholds:
        """The decision thresholds."""
        return Thresholds(self.accept_threshold, self.review_threshold)


class ScoreLogArgs(BaseModel):
    """The score buffer's bounds (rows), flush cadence and chunk-id retention (seconds), concurrent COPY writers."""

    model_config = ConfigDict(extra="forbid")

    max_buffered_rows: int = Field(default=200_000, ge=1)
    flush_rows: int = Field(default=5_000, ge=1)
    flush_interval_s: float = Field(default=0.5, gt=0)
    write_timeout_s: float = Field(default=10.0, gt=0)
    writers: int = Field(default=2, ge=1, le=8)
    chunk_id_retention_s: float = Field(default=86_400.0, gt=0)


class ReIDArgs(BaseModel):
    """ReID deployment args; defaults are the CPU demo (resnet50 at 224 px, seeded random weights)."""

    model_config = ConfigDict(extra="forbid")

    architecture: str = "resnet50"
    weights: str = Field(
        default=RANDOM_WEIGHTS,
        description="'imagenet' (packaged), a local state-dict/safetensors/re-ID model/TorchScript path, or"
        " 'random' (seeded; tests only). See docs/models.md.",
    )
    seed: int = 7
    input_size_px: int = Field(default=224, ge=16)
    device: str = "auto"
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads per replica.")
    max_ongoing_requests: int = Field(default=MAX_ONGOING_REQUESTS, ge=1)
    max_batch_size: int = Field(default=MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float = Field(default=BATCH_WAIT_TIMEOUT_S, ge=0)
    autoscaling_config: dict[str, Any] | None = None
    num_replicas: int = Field(default=1, ge=1, description="Used when autoscaling_config is not set.")
    gallery_cap_per_deer: int = Field(default=20, ge=1)
    gallery_refresh_s: float = Field(default=1.0, gt=0, description="Gallery version check period, seconds.")
    gallery_cache_sites: int = Field(default=256, ge=1, description="Most site galleries a replica holds at once.")
    top_k: int = Field(default=5, ge=1)
    score_log: ScoreLogArgs = Field(default_factory=ScoreLogArgs)
    user_config: ReIDUserConfig = Field(default_factory=ReIDUserConfig)

    def spec(self) -> ModelSpec:
        """The model spec."""
        return ModelSpec(self.architecture, self.weights, self.seed, self.input_size_px, self.device)


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    health_check_period_s=10,
    health_check_timeout_s=60,
)
class ReIDDeployment:
    """Embeds crops in batches and answers identifications; logs every similarity without waiting on Postgres."""

    # Serve awaits an async constructor (the model loads in a thread, the pool opens on the replica's loop).
    async def __init__(self, args: dict[str, Any], settings_overrides: dict[str, Any]) -> None:  # type: ignore[misc]
        self.memory = MemoryProbe()
        self.args = ReIDArgs.model_validate(args)
        self.settings = Settings(**settings_overrides)
        if self.args.torch_threads:
            import torch

            torch.set_num_threads(self.args.torch_threads)
        embedder = await asyncio.to_thread(Embedder, self.args.spec())
        self.pool = make_pool(self.settings.database_dsn, max_size=4)
        await self.pool.open(wait=False)
        score_dsn = str(self.settings.score_database_url or self.settings.database_url)
        log = self.args.score_log
        self.buffer = ScoreBuffer(
            score_dsn,
            limits=BufferLimits(**log.model_dump()),
            on_written=metrics.record_written,
            on_dropped=metrics.record_dropped,
        )
        self.buffer.start()
        self.identifier = Identifier(
            embedder,
            pool=self.pool,
            scores=self.buffer,
            options=IdentifierOptions(
                image_root=Path(self.settings.image_root),
                cap_per_deer=self.args.gallery_cap_per_deer,
                gallery_refresh_s=self.args.gallery_refresh_s,
                max_galleries=self.args.gallery_cache_sites,
                top_k=self.args.top_k,
                max_image_bytes=self.settings.max_image_bytes,
                max_image_pixels=self.settings.max_image_pixels,
                inline_scores=self.settings.score_database_url is None,
            ),
            thresholds=self.args.user_config.thresholds(),
            on_identified=metrics.record_identification,
        )
        self._batcher().set_max_batch_size(self.args.max_batch_size)
        self._batcher().set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def _batcher(self) -> Any:
        """The batch queue controls Serve attaches to the batched method."""
        return cast(Any, self.identify)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply thresholds (and optional batch settings) from user_config; no restart."""
        parsed = ReIDUserConfig.model_validate(config or {})
        self.identifier.thresholds = parsed.thresholds()
        if parsed.max_batch_size:
            self._batcher().set_max_batch_size(parsed.max_batch_size)
        if parsed.batch_wait_timeout_s is not None:
            self._batcher().set_batch_wait_timeout_s(parsed.batch_wait_timeout_s)
        logger.info("thresholds now accept=%s review=%s", parsed.accept_threshold, parsed.review_threshold)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)  # the args set both
    async def identify(self, requests: list[IdentifyRequest]) -> list[Identification | ImageConflict]:
        """Identify a batch of crops (Serve groups callers' requests); a refused image answers its ImageConflict."""
        metrics.record_batch(len(requests))
        return await self.identifier.identify_batch(requests)

    async def ready(self) -> str:
        """The model version, once the model is loaded (the ingress's readiness check)."""
        return self.identifier.embedder.model_version

    async def describe(self) -> dict[str, Any]:
        """What this replica runs: model, thresholds, batch settings, score-log counters, pid."""
        t = self.identifier.thresholds
        s = self.buffer.stats
        return {
            "pid": os.getpid(),
            "identified": self.identifier.identified,
            "model_version": self.identifier.embedder.model_version,
            "device": str(self.identifier.embedder.device),
            "accept_threshold": t.accept,
            "review_threshold": t.review,
            "max_batch_size": self._batcher()._get_max_batch_size(),
            "scores": {
                "written": s.written,
                "dropped": s.dropped,
                "dropped_by_reason": dict(s.dropped_by_reason),
                "pending": self.buffer.pending,
                "failed_flushes": s.failed_flushes,
                "last_error": s.last_error,
            },
        }

    def memory_report(self, top: int = 15) -> dict[str, Any]:
        """What this replica holds and what grew since its first report (serve_app/diagnostics.py)."""
        return self.memory.report(top=top)

    async def check_health(self) -> None:
        """Fails when the model cannot run on one blank crop."""
        await asyncio.to_thread(self.identifier.run_model_check)

    async def __del__(self) -> None:
        await self.buffer.close()
        await self.pool.close()


def reid_deployment(args: ReIDArgs, settings_overrides: dict[str, Any]) -> serve.Application:
    """The bound ReID deployment configured from typed args."""
    options: dict[str, Any] = {
        "max_ongoing_requests": args.max_ongoing_requests,
        "user_config": args.user_config.model_dump(),
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        # A model change (python -m batch.models promote) replaces replicas: start each new one before its old
        # one stops (Serve's default stops first), so identifications keep being answered meanwhile.
        "max_surge_percent": 100,
    }
    if args.autoscaling_config:
        options["autoscaling_config"] = args.autoscaling_config
    else:
        options["num_replicas"] = args.num_replicas
    deployment = cast(serve.Deployment, ReIDDeployment).options(**options)
    # user_config travels separately so a threshold change stays a lightweight (reconfigure-only) update.
    return deployment.bind(args.model_dump(exclude={"user_config"}), dict(settings_overrides))
