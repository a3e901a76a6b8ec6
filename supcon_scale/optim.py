"""Optimizer (timm's foreach LARS, SGD or AdamW) with parameter groups, and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
from timm.optim import Lars

from supcon_scale.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """The linear scaling rule of the official recipes: lr = base_lr x global_batch / 256."""
    return cfg.base_lr * global_batch_size / 256


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    """Two groups: weights (decay + LARS adaptation) and every 1-D tensor (batch-norm affine and biases) without.

    Exclusion is by tensor rank, not by name, so it survives DDP/FSDP/DeepSpeed wrapping, which prefixes the names.
    timm's Lars adapts only groups with weight_decay != 0, so the second group gets plain momentum SGD.
    """
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if cfg.exclude_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, global_batch_size: int, lars_class: type[Lars] = Lars
) -> torch.optim.Optimizer:
    """The optimizer over `param_groups`; an engine whose optimizer sees sharded tensors passes its own `lars_class`."""
    lr = scaled_lr(cfg, global_batch_size)
    groups = param_groups(model.named_parameters(), cfg)
    if cfg.name == "lars":
        # timm's trust ratio is the apex/solo-learn form eta*|w| / (|g| + wd*|w| + eps), not the TF form
        # eta*|w| / |g + wd*w| (SimCLR/SupCon TF, MoCo v3); both are 1.0 where a norm is zero.
        return lars_class(groups, lr=lr, momentum=cfg.momentum, trust_coeff=cfg.trust_coeff, foreach=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True)
    return torch.optim.AdamW(groups, lr=lr, foreach=True)


def lr_lambda(step: int, total_steps: int, warmup_steps: int, final_fraction: float, schedule: str) -> float:
    """Multiplier of the peak LR at `step`: linear warm-up, then cosine decay to `final_fraction` (or constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule (stepped after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(step, total_steps, warmup_steps, cfg.final_lr_fraction, cfg.schedule),
    )
