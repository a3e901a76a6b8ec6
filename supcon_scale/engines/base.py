"""The one interface every engine (ddp, fsdp, deepspeed) implements; the trainer sees nothing else."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn as nn

from supcon_scale.config import RunConfig
from supcon_scale.distributed import Context

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(ABC):
    """Wraps the model and owns its optimizer, LR schedule and (fp16) loss scaling.

    `engine(x)` runs the forward pass, `backward(loss)` and `step()` one optimizer update. `state_dict()` is a
    collective: every rank calls it, and rank 0 receives the full (unsharded) model and optimizer state.
    """

    name: str = "base"

    def __init__(self, cfg: RunConfig, ctx: Context):
        self.cfg = cfg
        self.ctx = ctx
        self.skipped_steps = 0

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> bool:
        """Apply the update (and advance the LR schedule); False when the step was skipped (non-finite grads)."""

    @abstractmethod
    def unwrapped(self) -> nn.Module:
        """The plain model (SupConModel) whose parameters this engine trains."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """{"model", "optimizer", "scheduler", "scaler"}: plain tensors and primitives (safe for weights_only)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    @abstractmethod
    def lr(self) -> float: ...

    def train(self, mode: bool = True) -> None:
        self.unwrapped().train(mode)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision around the forward pass; losses are computed in fp32 by the loss itself."""
        dtype = AUTOCAST_DTYPES.get(self.cfg.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=dtype)
