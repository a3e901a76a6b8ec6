"""Engines: one interface (`Engine`) over DDP, FSDP2 and DeepSpeed; `build` picks one from `engine.name`."""

from __future__ import annotations

import torch.nn as nn

from supcon_scale.config import RunConfig
from supcon_scale.distributed import Context
from supcon_scale.engines.base import Engine


def build(cfg: RunConfig, ctx: Context, model: nn.Module, total_steps: int, warmup_steps: int) -> Engine:
    """Wrap `model`, then create its optimizer and schedule (sharded engines need the wrapped parameters)."""
    engine: Engine
    if cfg.engine.name == "ddp":
        from supcon_scale.engines.ddp import DDPEngine

        engine = DDPEngine(cfg, ctx, model, total_steps, warmup_steps)
    elif cfg.engine.name == "fsdp":
        from supcon_scale.engines.fsdp import FSDPEngine

        engine = FSDPEngine(cfg, ctx, model, total_steps, warmup_steps)
    else:
        from supcon_scale.engines.deepspeed import DeepSpeedEngine

        engine = DeepSpeedEngine(cfg, ctx, model, total_steps, warmup_steps)
    if cfg.train.compile:
        engine.compile()
    return engine


__all__ = ["Engine", "build"]
