"""`EngineSpec`: the part of a run an engine reads (precision, the engine and optimizer sections, the batch), built
from a training run's config in one place (`EngineSpec.from_run`); the continual run builds its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from supcon_scale.config import EngineConfig, OptimConfig, RunConfig


@dataclass(frozen=True)
class EngineSpec:
    """What an engine needs to wrap a model and build its optimizer and schedule; nothing else of the run."""

    engine: EngineConfig
    optim: OptimConfig
    precision: Literal["fp32", "bf16", "fp16"]
    global_batch: int  # samples per optimizer step over all ranks (DeepSpeed's train_batch_size; optim.scaled_lr)
    image_size: (
        int  # the smallest training view: torch's CPU bf16 kernel fails below CPU_BF16_MIN_IMAGE_SIZE (rules.py)
    )
    channels_last: bool = False
    sync_bn: bool = False  # batch-norm statistics are global, so DDP need not re-broadcast the buffers
    compile: bool = False
    tf32: bool = True

    @classmethod
    def from_run(cls, cfg: RunConfig) -> EngineSpec:
        """A training run's spec: its LR scaled by the global batch (the paper's rule, optim.scaled_lr)."""
        return cls(
            engine=cfg.engine,
            optim=cfg.optim,
            precision=cfg.precision,
            global_batch=cfg.data.global_batch_size,
            image_size=min(cfg.data.view_sizes or [cfg.data.image_size]),  # multi-crop: the small views
            channels_last=cfg.model.channels_last,
            sync_bn=cfg.model.sync_bn,
            compile=cfg.train.compile,
            tf32=cfg.tf32,
        )
