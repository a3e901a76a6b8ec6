"""Frozen siblings of the model: the momentum encoder (`model.momentum`) and the EMA weights (`train.ema_decay`).

Each is a `timm.utils.ModelEmaV3` of the model's `encoder` + `head` (a view, `online`, whose state dict order is the
model's), held as a submodule of the SupConModel itself: `momentum` and `ema`. So whatever the engine does to the
model it does to them (DDP replicates and broadcasts their buffers, FSDP2 shards them with the same units as the
encoder, `engines/fsdp.py`, ZeRO-1/2 keep them replicated) and every checkpoint carries them as model entries
(`momentum.module.encoder.*`, `ema.module.head.*`, ...). They never train: `requires_grad=False`, so no optimizer
holds them (`optim.param_groups` skips frozen parameters) and no gradient is reduced for them. The update is timm's
in-place `torch._foreach_lerp_` on whatever each rank holds (a DTensor shard under FSDP2: a local op).

- momentum (MoCo v3, Chen et al. 2021, sec. 4 and its `adjust_moco_momentum`): parameters only,
  theta_k <- m_t theta_k + (1 - m_t) theta_q with m_t = 1 - (1 - m0) (1 + cos(pi t / T)) / 2 over the run's T
  optimizer steps (timm's `apply_update_no_buffers_`). Batch-norm buffers (running mean/var, counts) are copied from
  the online model at each update: the sibling runs in train mode like MoCo v3's momentum encoder, so its keys use
  the batch's statistics and its running averages are never read in training; copying keeps them defined and equal
  on every rank after each update.
- ema (timm's ModelEmaV3 `apply_update_`): every floating state entry, buffers included,
  ema <- d ema + (1 - d) w with the constant d = `train.ema_decay`; integer entries (batch-norm counts) are copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from supcon_scale.hooks import Hook, StepInfo

SIBLINGS = ("momentum", "ema")  # the SupConModel attributes that hold them; their state dict prefixes


def online(model: nn.Module) -> nn.ModuleDict:
    """The trained part of a SupConModel as one module (`encoder`, then `head`: the model's own state dict order), the
    thing each sibling copies and follows. Built on each call and never registered: its entries are the model's."""
    return nn.ModuleDict({"encoder": model.encoder, "head": model.head})


def _frozen_copy(model: nn.Module, decay: float, exclude_buffers: bool) -> ModelEmaV3:
    """A ModelEmaV3 of `online(model)` with no parameter that trains; a block's activation-checkpointing forward
    (models.enable_activation_checkpointing, an instance attribute) is dropped in the copy: it runs under no_grad."""
    sibling = ModelEmaV3(online(model), decay=decay, exclude_buffers=exclude_buffers)
    for module in sibling.modules():
        module.__dict__.pop("forward", None)
    sibling.requires_grad_(False)
    return sibling.train(model.training)  # ModelEmaV3 sets eval; the model's train()/eval() decide, as in MoCo v3


def attach(model: nn.Module, momentum: float | None, ema_decay: float | None) -> nn.Module:
    """Give `model` (a SupConModel) its siblings: `model.momentum` (`model.momentum` m0) and `model.ema`
    (`train.ema_decay`); None leaves that one out. Call before the engine wraps it (and after batch-norm conversion)."""
    if momentum is not None:
        model.momentum = _frozen_copy(model, momentum, exclude_buffers=True)
    if ema_decay is not None:
        model.ema = _frozen_copy(model, ema_decay, exclude_buffers=False)
    return model


def sibling(model: nn.Module, name: str) -> ModelEmaV3 | None:
    """`model`'s `name` sibling ("momentum" or "ema"), or None."""
    found = getattr(model, name, None)
    return found if isinstance(found, ModelEmaV3) else None


def has_siblings(model: nn.Module) -> bool:
    """Whether `model` has a momentum or EMA sibling (the trainer then adds `SiblingUpdate`)."""
    return any(sibling(model, name) is not None for name in SIBLINGS)


def momentum_at(m0: float, step: int, total: int) -> float:
    """MoCo v3's momentum after `step` of `total` optimizer steps: m0 at the start, 1 at the end (half cosine)."""
    return 1.0 - (1.0 - m0) * (1.0 + math.cos(math.pi * step / max(total, 1))) / 2.0


@torch.no_grad()
def update(model: nn.Module, step: int, total: int) -> None:
    """The siblings after optimizer step `step` (1-based) of `total`: momentum with m_step, EMA with its decay."""
    view = online(model)
    key = sibling(model, "momentum")
    if key is not None:
        key.apply_update_no_buffers_(view, momentum_at(key.decay, step, total))
    ema = sibling(model, "ema")
    if ema is not None:
        ema_update(ema, view)


def ema_update(ema: ModelEmaV3, view: nn.Module) -> None:
    """timm's `ModelEmaV3.apply_update_` at its constant decay (`get_decay()`), its lerp (`_foreach_lerp_`) called
    once per tensor kind: under FSDP2 the parameters are DTensor shards and the buffers plain tensors, which one
    foreach call cannot mix. Integer entries (batch-norm counts) are copied, as timm does."""
    floats: dict[type, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for ema_v, model_v in zip(ema.module.state_dict().values(), view.state_dict().values(), strict=True):
        if ema_v.is_floating_point():
            pair = floats.setdefault(type(ema_v), ([], []))
            pair[0].append(ema_v)
            pair[1].append(model_v)
        else:
            ema_v.copy_(model_v)
    for ema_values, model_values in floats.values():
        ema._foreach_lerp_(ema_values, model_values, weight=1.0 - ema.get_decay())


def keys(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The momentum sibling's embeddings of `x`, no gradient: the queue's keys (MoCo v3). Called inside the wrapped
    forward so FSDP2's pre-forward hooks gather the sibling's shards (its encoder, blocks and head are units)."""
    key = sibling(model, "momentum")
    assert key is not None, "keys() needs the momentum sibling"
    with torch.no_grad():
        return model.project(key.module.encoder(x), key.module.head)


class SiblingUpdate(Hook):
    """After each applied step, the siblings follow the online weights (`update`); a skipped step leaves them.

    Ordering: MoCo v3 updates the momentum encoder at the start of the next forward, with the momentum of that
    iteration (t = steps done); updating right after step t with m_t gives the same sequence of weights, and its
    first update (before any step, a copy onto itself) is a no-op. Registered right after the logger, so monitors
    and the Checkpointer see the updated siblings."""

    def __init__(self, model: nn.Module, total_steps: int):
        self.model = model
        self.total_steps = total_steps

    def on_step(self, info: StepInfo) -> None:
        if info.stepped:
            update(self.model, info.step, self.total_steps)


def update_hooks(model: nn.Module, total_steps: int) -> list[Hook]:
    """The hooks `trainer.build` adds right after the logger: a `SiblingUpdate` when `model` has a sibling."""
    return [SiblingUpdate(model, total_steps)] if has_siblings(model) else []


def fill_missing(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's model state for a run whose siblings differ from the saving run's (a change that
    `train.allow_changes` accepted): a sibling the checkpoint lacks starts as a copy of its online entries (as a new
    sibling does), a sibling this run lacks is dropped. Anything else stays as saved for `weights.check_matching`."""
    prefixes = tuple(f"{name}.module." for name in SIBLINGS)
    state = {k: v for k, v in saved.items() if not k.startswith(prefixes) or k in own}
    for k in own:
        if k not in state and k.startswith(prefixes):
            source = k.split(".module.", 1)[1]
            if source in saved:
                state[k] = saved[source]
    return state
