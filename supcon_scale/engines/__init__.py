"""Engines: one interface (`Engine`) over DDP, FSDP2 and DeepSpeed; `build` picks one from `engine.name`.

An engine reads an `EngineSpec` (engines/spec.py), not the run's whole config; its rules are in engines/rules.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from supcon_scale.distributed import Context
from supcon_scale.engines.base import Engine
from supcon_scale.engines.rules import check
from supcon_scale.engines.spec import EngineSpec


def cuda_settings(spec: EngineSpec, ctx: Context) -> None:
    """The GPU's speed settings, once before the model runs: cuDNN autotuning (every step has the same shapes) and
    the `tf32` policy for fp32 matmuls and convolutions (bf16/fp16 autocast regions are unaffected)."""
    if ctx.device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    # The legacy pair, not `fp32_precision`: mixing the two APIs makes torch.get_float32_matmul_precision() raise,
    # and inductor calls it.
    torch.set_float32_matmul_precision("high" if spec.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = spec.tf32


def build(spec: EngineSpec, ctx: Context, model: nn.Module, total_steps: int, warmup_steps: int) -> Engine:
    """Wrap `model`, then create its optimizer and schedule (sharded engines need the wrapped parameters)."""
    check(spec, ctx.device.type)
    cuda_settings(spec, ctx)
    engine: Engine
    if spec.engine.name == "ddp":
        from supcon_scale.engines.ddp import DDPEngine

        engine = DDPEngine(spec, ctx, model, total_steps, warmup_steps)
    elif spec.engine.name == "fsdp":
        from supcon_scale.engines.fsdp import FSDPEngine

        engine = FSDPEngine(spec, ctx, model, total_steps, warmup_steps)
    else:
        from supcon_scale.engines.deepspeed import DeepSpeedEngine

        engine = DeepSpeedEngine(spec, ctx, model, total_steps, warmup_steps)
    if spec.compile:
        engine.compile()
    return engine


__all__ = ["Engine", "EngineSpec", "build", "check"]
