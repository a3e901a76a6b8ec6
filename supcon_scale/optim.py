"""Optimizer (timm's foreach LARS or LAMB, torch's SGD or AdamW; timm's RMSpropTF for the linear probe) with
parameter groups, and the learning-rate schedules: warm-up + cosine, and the linear probe's staircase and piecewise
decays."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn
from timm.optim import Lamb, Lars

from supcon_scale.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """The linear scaling rule of the official recipes: lr = base_lr x global_batch / 256 (`optim.scale_lr`; off,
    base_lr is the learning rate itself: fine-tuning's absolute `--lr`)."""
    return cfg.base_lr * global_batch_size / 256 if cfg.scale_lr else cfg.base_lr


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """timm's `no_weight_decay()` of every submodule that has one (a ViT: pos_embed, cls_token, ...), as patterns
    over `model.named_parameters()` names (timm matches them with fnmatch)."""
    names = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    cfg: OptimConfig,
    no_decay_names: Iterable[str] = (),
    layers: tuple[Mapping[str, int], int] | None = None,
) -> list[dict]:
    """Weights (decay + LARS adaptation) and, apart, every 1-D tensor (norm affines, biases) and every name in
    `no_decay_names` (timm's `no_weight_decay()`) without: timm's `param_groups_weight_decay` rule. timm's Lars
    adapts only groups with weight_decay != 0, so those get plain momentum SGD.

    With `layers` (`models.layer_ids`: each name's layer l and the block count n) and `cfg.layer_decay` d, the groups
    are split by layer and each carries `lr_scale` = d ** (n + 1 - l) (BEiT, Bao et al. 2022, sec. 2.4; MAE's
    util/lr_decay.py): the head 1, the last block d, the embeddings d ** (n + 1).
    """
    patterns = tuple(no_decay_names)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        decay = not (cfg.exclude_bn_bias and exempt)
        layer, scale = 0, 1.0
        if layers is not None and cfg.layer_decay is not None:
            ids, n = layers
            layer = ids[name]
            scale = cfg.layer_decay ** (n + 1 - layer)
        group = groups.setdefault(
            (layer, not decay), {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]  # by layer; in a layer, the decayed group first


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    global_batch_size: int,
    lars_class: type[Lars] = Lars,
    layers: tuple[Mapping[str, int], int] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer over `param_groups`, each group at the scaled LR times its `lr_scale` (the schedule multiplies
    each group's initial LR); an engine whose optimizer sees sharded tensors passes its own `lars_class`."""
    lr = scaled_lr(cfg, global_batch_size)
    groups = param_groups(model.named_parameters(), cfg, no_weight_decay_names(model), layers)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return create_optimizer(groups, cfg, lr, lars_class)


def create_optimizer(
    groups: list[dict], cfg: OptimConfig, lr: float, lars_class: type[Lars] = Lars
) -> torch.optim.Optimizer:
    """`cfg.name`'s optimizer over parameter groups at `lr`: `build_optimizer`'s, or a linear probe's head."""
    if cfg.name == "lars":
        # timm's trust ratio is the apex/solo-learn form eta*|w| / (|g| + wd*|w| + eps), not the TF form
        # eta*|w| / |g + wd*w| (SimCLR/SupCon TF, MoCo v3); both are 1.0 where a norm is zero.
        return lars_class(groups, lr=lr, momentum=cfg.momentum, trust_coeff=cfg.trust_coeff, foreach=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True)
    eps = {} if cfg.eps is None else {"eps": cfg.eps}
    if cfg.name == "lamb":
        # No global gradient clipping: LAMB (You et al. 2020, Algorithm 2) has none; timm's default max_grad_norm=1.0
        # is NVIDIA's addition. Weight decay as in the paper (added to the Adam update before the trust ratio).
        return Lamb(groups, lr=lr, betas=cfg.betas, max_grad_norm=None, foreach=True, **eps)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, foreach=True, **eps)


def rmsprop_tf(
    params: Iterable[nn.Parameter], lr: float, *, alpha: float, eps: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """TF's RMSProp, the official linear stage's optimizer: timm's RMSpropTF (accumulator from 1, eps inside the
    root, LR inside momentum), weight decay as the L2 gradient wd * w."""
    from timm.optim import RMSpropTF

    return RMSpropTF(
        params, lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay, lr_in_momentum=True
    )


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's current LR: that of the groups at `lr_scale` 1 (layer-wise decay lowers the others)."""
    return max(g["lr"] for g in optimizer.param_groups)


def lr_lambda(step: int, total_steps: int, warmup_steps: int, final_fraction: float, schedule: str) -> float:
    """Multiplier of the peak LR at `step`: linear warm-up, then cosine decay to `final_fraction` (or constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def staircase(step: float, every: float, rate: float) -> float:
    """Multiplier `rate` ** floor(step / every): tf.train.exponential_decay(staircase=True), the official linear
    stage's decay."""
    return rate ** math.floor(step / every)


def piecewise(step: float, boundaries: Iterable[float], rate: float) -> float:
    """Multiplier `rate` ** (boundaries passed, step > b): tf piecewise_constant over rate ** i, and main_linear.py's
    per-epoch decay (step: the 1-based epoch)."""
    return rate ** sum(step > b for b in boundaries)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule (stepped after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(step, total_steps, warmup_steps, cfg.final_lr_fraction, cfg.schedule),
    )
