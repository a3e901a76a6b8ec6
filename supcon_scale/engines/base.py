"""The one interface every engine (ddp, fsdp, deepspeed) implements, and `TorchEngine`, what ddp and fsdp share."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from supcon_scale import models, optim
from supcon_scale.distributed import Context, all_reduce_min
from supcon_scale.engines.spec import EngineSpec

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(
    spec: EngineSpec, model: nn.Module, lars_class: type[optim.Lars] = optim.Lars
) -> torch.optim.Optimizer:
    """`optim.build_optimizer` with each parameter's layer (`models.layer_ids`) when `optim.layer_decay` is set."""
    layers = models.layer_ids(model) if spec.optim.layer_decay is not None else None
    return optim.build_optimizer(model, spec.optim, spec.global_batch, lars_class, layers)


def local_grads_finite(params: list[nn.Parameter]) -> torch.Tensor:
    """1 where every local gradient is finite (a DTensor gradient is checked on its local shard), else 0.

    From the gradients' norms (`torch._foreach_norm`: a few fused kernels, where an `isfinite` per tensor launched
    ~320 tiny ones for ResNet-50): a norm is finite exactly when its tensor is (a finite tensor whose norm overflows
    fp32 counts as non-finite, as it would overflow the update too).
    """
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(1, dtype=torch.int32)
    return torch.stack(torch._foreach_norm(grads)).isfinite().all().to(torch.int32)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def grad_scaler(spec: EngineSpec, ctx: Context) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only (bf16 has fp32's range); a disabled scaler passes everything through."""
    return torch.amp.GradScaler(ctx.device.type, enabled=spec.precision == "fp16")


def scaled_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    params: list[nn.Parameter],
    device: torch.device,
) -> bool:
    """One optimizer + schedule step, or none on every rank when any gradient anywhere is not finite.

    One all-reduce (MIN) of a device-side finite flag and one host read, no sync per parameter (as torchtitan checks
    its loss before `optimizer.step()`). fp16: the gradients are unscaled first and the same flag decides the step;
    `scaler.update()` then backs off from the inf checks `unscale_` recorded. (`scaler.step` would read its found-inf
    flag, and comparing scales before and after two more: three host syncs a step.)
    """
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    stepped = bool(all_reduce_min(local_grads_finite(params).to(device)).item())
    if stepped:
        optimizer.step()
    if scaler.is_enabled():
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if stepped:
        scheduler.step()
    return stepped


class Engine(ABC):
    """Wraps the model and owns its optimizer, LR schedule and (fp16) loss scaling.

    `engine(x)` runs the forward pass, `backward(loss)` and `step()` one optimizer update. `state_dict()` is a
    collective: every rank calls it, and rank 0 receives the full (unsharded) model and optimizer state.
    """

    name: str = "base"

    def __init__(self, spec: EngineSpec, ctx: Context):
        self.spec = spec
        self.ctx = ctx
        self.skipped_steps = 0

    @property
    @abstractmethod
    def forward_module(self) -> nn.Module:
        """The module the forward pass calls: the model wrapped for this engine (DDP, FSDP2 or DeepSpeed)."""

    def __call__(self, x: torch.Tensor | list[torch.Tensor]) -> Any:
        """The wrapped model on one batch or on a step's list of views (`models.SupConModel.forward`)."""
        return self.forward_module(x)

    def compile(self) -> None:
        """`train.compile`: torch.compile the wrapped forward in place, so the engine's hooks stay around it."""
        self.forward_module.compile()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> bool:
        """Apply the update (and advance the LR schedule); False when the step was skipped (non-finite grads)."""

    @abstractmethod
    def unwrapped(self) -> nn.Module:
        """The plain model (SupConModel) whose parameters this engine trains."""

    def full_encoder(self) -> nn.Module:
        """Collective: the encoder holding its full current weights, a plain module each rank can run on its own (the
        kNN monitor encodes each rank's share of the images with it). Unsharded engines: the model's own encoder."""
        return self.unwrapped().encoder

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
        dtype = AUTOCAST_DTYPES.get(self.spec.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=dtype)


class TorchEngine(Engine):
    """An engine on torch's own optimizer, LR schedule and GradScaler (ddp, fsdp).

    It builds them, runs backward and the (skippable) step and saves the schedule and scaler; a subclass says how it
    wraps the model (`wrap`) and, if sharded, how model and optimizer state are gathered and loaded.
    """

    def __init__(self, spec: EngineSpec, ctx: Context, model: nn.Module, total_steps: int, warmup_steps: int):
        super().__init__(spec, ctx)
        # Sharded engines wrap first: their optimizer must hold the wrapped (sharded) parameters.
        self.model = self.wrap(model.to(ctx.device))
        self.optimizer = build_optimizer(spec, self.model)
        self.scheduler = optim.build_scheduler(self.optimizer, spec.optim, total_steps, warmup_steps)
        self.scaler = grad_scaler(spec, ctx)

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Lay out and wrap (or shard) `model`, already on the device; returns the model whose parameters train."""

    @property
    def forward_module(self) -> nn.Module:
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        # DDP all-reduces and FSDP2 reduce-scatters the gradients, both with a mean over ranks.
        self.scaler.scale(loss).backward()

    def step(self) -> bool:
        stepped = scaled_step(
            self.optimizer, self.scheduler, self.scaler, list(self.model.parameters()), self.ctx.device
        )
        self.skipped_steps += not stepped
        return stepped

    def unwrapped(self) -> nn.Module:
        """The plain model; under FSDP2 (sharded in place) its parameters are DTensors, so save via `state_dict()`."""
        return self.model

    def model_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and the optimizer's state dicts (a sharded engine gathers them to rank 0)."""
        return self.model.state_dict(), self.optimizer.state_dict()

    def load_model_optimizer_state(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        """Load the full model and optimizer state (a sharded engine keeps this rank's shard of it)."""
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = self.model_optimizer_state()
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_model_optimizer_state(state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def lr(self) -> float:
        return optim.peak_lr(self.optimizer)
