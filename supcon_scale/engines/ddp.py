"""DistributedDataParallel engine (gloo on CPU, NCCL on GPU); a plain module in a single process."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from supcon_scale import optim
from supcon_scale.config import RunConfig
from supcon_scale.distributed import Context
from supcon_scale.engines.base import Engine, grad_scaler, scaled_step


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, cfg: RunConfig, ctx: Context, model: nn.Module, total_steps: int, warmup_steps: int):
        super().__init__(cfg, ctx)
        model = model.to(ctx.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.wrapped: nn.Module = (
            DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
            if ctx.distributed
            else model
        )
        self.optimizer = optim.build_optimizer(model, cfg.optim, cfg.data.global_batch_size)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.optim, total_steps, warmup_steps)
        self.scaler = grad_scaler(cfg, ctx)

    @property
    def forward_module(self) -> nn.Module:
        return self.wrapped

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> bool:
        stepped = scaled_step(self.optimizer, self.scheduler, self.scaler, list(self.model.parameters()), self.ctx.device)
        self.skipped_steps += not stepped
        return stepped

    def unwrapped(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
