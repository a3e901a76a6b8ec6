"""FSDP2 engine: `fully_shard` per ResNet stage, then the root; exact LARS on DTensor shards.

Parameters, gradients and optimizer state are sharded over the data-parallel ranks; each stage's parameters are
all-gathered just before its forward/backward. Mixed precision is torch autocast around fp32 parameters (not
FSDP's `MixedPrecisionPolicy(param_dtype=bf16)`, which would run BatchNorm and its running statistics in bf16 --
the known FSDP + BatchNorm failure), so master weights, gradient reduction and optimizer state stay fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from supcon_scale import optim
from supcon_scale.config import RunConfig
from supcon_scale.distributed import Context
from supcon_scale.engines.base import Engine, grad_scaler, scaled_step

# Encoder children that are one "stage" each (timm ResNet: layer1..layer4; ConvNeXt/RegNet-style: stages).
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules to shard separately: each ResNet stage (or `stages[i]`) of the encoder, in forward order."""
    encoder = getattr(model, "encoder", model)
    units = [getattr(encoder, n) for n in STAGE_NAMES if isinstance(getattr(encoder, n, None), nn.Module)]
    stages = getattr(encoder, "stages", None)
    if not units and isinstance(stages, (nn.Sequential, nn.ModuleList)):
        units = list(stages)
    return units


class FSDPEngine(Engine):
    """FSDP2 data parallelism; a plain module when there is a single process (nothing to shard)."""

    name = "fsdp"

    def __init__(self, cfg: RunConfig, ctx: Context, model: nn.Module, total_steps: int, warmup_steps: int):
        super().__init__(cfg, ctx)
        model = model.to(ctx.device)
        self.sharded = ctx.distributed and dist.is_initialized()
        # FSDP2 refuses non-contiguous (channels-last) parameters; channels-last inputs from the loader still give
        # channels-last activations, the weights are converted by the convolution kernels.
        if cfg.model.channels_last and not self.sharded:
            model = model.to(memory_format=torch.channels_last)
        if self.sharded:
            for unit in shard_units(model):
                fully_shard(unit)
            fully_shard(model)
        self.model = model
        # timm's foreach LARS on DTensors: torch._foreach_norm returns _NormPartial DTensors that are reduced across
        # ranks before the trust ratio is formed, so the ratio uses the global per-tensor norms (FACTS.md section 4);
        # tests/test_engines.py checks the result against one process on the global batch.
        self.optimizer = optim.build_optimizer(model, cfg.optim, cfg.data.global_batch_size)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.optim, total_steps, warmup_steps)
        self.scaler = grad_scaler(cfg, ctx)  # torch's GradScaler takes FSDP2's DTensor gradients as they are

    @property
    def forward_module(self) -> nn.Module:
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP2 reduce-scatters with a mean over ranks, like DDP's all-reduce average.
        self.scaler.scale(loss).backward()

    def step(self) -> bool:
        stepped = scaled_step(self.optimizer, self.scheduler, self.scaler, list(self.model.parameters()), self.ctx.device)
        self.skipped_steps += not stepped
        return stepped

    def unwrapped(self) -> nn.Module:
        """The model itself (FSDP2 shards in place); its parameters are DTensors, so use `state_dict()` to save."""
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Collective. Rank 0 gets the full model (plain keys) and an optimizer state keyed by parameter name."""
        if not self.sharded:
            model_sd, optim_sd = self.model.state_dict(), self.optimizer.state_dict()
        else:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
        return {"model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Collective. Every rank passes the full saved state (as `checkpoint.load` gives it); each keeps its shard."""
        if not self.sharded:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
