"""DistributedDataParallel engine (gloo on CPU, NCCL on GPU); a plain module in a single process."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from supcon_scale.engines.base import TorchEngine


class DDPEngine(TorchEngine):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        """Channels-last parameters if asked; DDP around the model when there are several processes."""
        if self.spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        # Global batch norm gives every rank the same running statistics: re-broadcasting ~100 buffers from rank 0
        # before each forward would only cost a collective.
        broadcast = not self.spec.sync_bn
        self.wrapped: nn.Module = (
            DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=broadcast)
            if self.ctx.distributed
            else model
        )
        return model

    @property
    def forward_module(self) -> nn.Module:
        return self.wrapped
