"""The linear-probe protocols (docs/EVALUATION.md): their presets, and the optimizer and LR schedule of each, built
by supcon_scale/optim.py.

- `official`: the google-research/supcon stage 2, in its ImageNet form (TF RMSProp, i.e. timm's `RMSpropTF`; LR
  scaled by the stage-1 batch; 12 warm-up epochs, then x0.97 every half epoch; 90 epochs; wd 1e-6; label smoothing
  0.05) or its CIFAR form (momentum SGD 2.5 per 256, x0.2 after epochs 60/75/90, 100 epochs, no wd); both train
  on the stage-1 augmented stream with batch norm in train mode whose running statistics do not move, and feed
  the classifier the L2-normalised features when the run set `model.normalize_encoder_output`.
- `hobbitlong`: HobbitLong/SupContrast `main_linear.py` (SGD 0.1, x0.2 after epochs 60/75/90, crop 0.2-1 + flip,
  batch norm in eval mode).
- `fast`: not a published recipe; L-BFGS on standardised cached features, for demos and monitors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from supcon_scale import config, optim

PresetName = Literal["official", "official_imagenet", "official_cifar", "hobbitlong", "fast", "paper", "sgd"]


@dataclass(frozen=True)
class Preset:
    """One linear-probe recipe. `base_lr` is per 256 images unless `scale_lr` is False (then absolute)."""

    optimizer: Literal["rmsprop", "sgd", "lbfgs"]
    epochs: int
    base_lr: float
    weight_decay: float
    label_smoothing: float
    schedule: Literal["exponential", "piecewise", "epoch_steps", "cosine", "none"]
    standardize: bool
    batch_size: int = 256
    warmup_epochs: float = 0.0
    decay_rate: float = 1.0
    decay_every_epochs: float = 1.0  # exponential: one decay per this many epochs (staircase)
    boundaries: tuple[int, ...] = ()  # piecewise / epoch_steps: epochs after which the LR is x decay_rate
    stream: Literal["cached", "stage1", "crop_flip"] = "cached"  # what the head trains on
    bn: Literal["eval", "train_frozen"] = "eval"  # encoder batch norm while the head trains
    stage1_batch: bool = False  # batch (and LR scaling) = the pre-training run's global batch
    scale_lr: bool = True
    momentum: float = 0.9
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1e-3


PRESETS: dict[str, Preset] = {
    # google-research/supcon supcon_imagenet_resnet50.sh stage 2 (hparams_flags.py defaults for the unset flags:
    # stage_2_warmup_epochs=12, stage_2_rmsprop_epsilon=0.001; utils.build_optimizer: decay 0.9, momentum 0.9).
    "official_imagenet": Preset(
        "rmsprop",
        90,
        0.05,
        1e-6,
        0.05,
        "exponential",
        standardize=False,
        warmup_epochs=12.0,
        decay_rate=0.97,
        decay_every_epochs=0.5,
        stream="stage1",
        bn="train_frozen",
        stage1_batch=True,
    ),  # fmt: skip
    # supcon_cifar10_resnet50.sh stage 2: MOMENTUM 2.5 per 256, PIECEWISE_LINEAR x0.2 at 60/75/90, no warm-up, no wd.
    "official_cifar": Preset(
        "sgd",
        100,
        2.5,
        0.0,
        0.0,
        "piecewise",
        standardize=False,
        decay_rate=0.2,
        boundaries=(60, 75, 90),
        stream="stage1",
        bn="train_frozen",
        stage1_batch=True,
    ),  # fmt: skip
    # HobbitLong/SupContrast main_linear.py: batch 256, SGD 0.1 (absolute), momentum 0.9, x0.2 after epochs 60/75/90.
    "hobbitlong": Preset(
        "sgd",
        100,
        0.1,
        0.0,
        0.0,
        "epoch_steps",
        standardize=False,
        decay_rate=0.2,
        boundaries=(60, 75, 90),
        stream="crop_flip",
        scale_lr=False,
    ),  # fmt: skip
    # Not a published recipe: full-batch L-BFGS on standardised cached features, L2 picked on a held-out 20% of the
    # train split (never on val). Converges in seconds on small data; use it for demos and monitors.
    "fast": Preset("lbfgs", 100, 1.0, 0.0, 0.0, "none", standardize=True),
    # Older names: `paper` is the official protocol; `sgd` is SGD 0.1 per 256 with a cosine on cached features.
    "sgd": Preset("sgd", 100, 0.1, 0.0, 0.0, "cosine", standardize=False),
}
ALIASES = {"official": "official", "paper": "official"}  # resolved per checkpoint: ImageNet or CIFAR form
FAST_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
PROTOCOL_NAMES = sorted([*PRESETS, *ALIASES])


def resolve_protocol(name: str, stage1: config.RunConfig | None) -> tuple[str, Preset]:
    """The preset `name` names; `official` (and its older name `paper`) picks the CIFAR form for a CIFAR-stem run."""
    if name in ALIASES:
        cifar = stage1 is not None and (stage1.model.cifar_stem or stage1.data.eval_crop == "identity")
        name = "official_cifar" if cifar else "official_imagenet"
    if name not in PRESETS:
        raise ValueError(f"--protocol/--preset: unknown protocol {name!r}; choose from {', '.join(PROTOCOL_NAMES)}")
    return name, PRESETS[name]


def make_optimizer(preset: Preset, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """TF's RMSProp (`optim.rmsprop_tf`) or momentum SGD (`optim.create_optimizer`) over the head's tensors.

    Weight decay is the L2 gradient wd * w on every head tensor, bias included: the official stage 2 adds
    wd * sum(|w|^2 / 2) over the classifier's variables (use_bias_weight_decay=True).
    """
    if preset.optimizer == "rmsprop":
        return optim.rmsprop_tf(
            params, lr, alpha=preset.rmsprop_decay, eps=preset.rmsprop_eps, momentum=preset.momentum,
            weight_decay=preset.weight_decay,
        )  # fmt: skip
    # TF's MomentumOptimizer is accum = m * accum + g, w -= lr * accum: torch's SGD without dampening or Nesterov
    sgd = config.OptimConfig(name="sgd", momentum=preset.momentum, weight_decay=preset.weight_decay)
    return optim.create_optimizer([{"params": params, "weight_decay": preset.weight_decay}], sgd, lr)


def lr_at(preset: Preset, peak: float, step: int, steps_per_epoch: float, total_steps: int) -> float:
    """The learning rate of `step` (0-based), as utils.build_learning_rate_schedule (official) or main_linear.py.

    `steps_per_epoch` is images / batch, a float as in the official launcher.
    """
    warmup = int(preset.warmup_epochs * steps_per_epoch)
    if step < warmup:  # maybe_add_warmup_to_lr: target * counter / warmup_steps, from 0 (optim.lr_lambda's from 1)
        return peak * step / warmup
    t = step - warmup  # the decay counts from the warm-up's end
    if preset.schedule == "exponential":  # tf.train.exponential_decay(staircase=True)
        return peak * optim.staircase(t, steps_per_epoch * preset.decay_every_epochs, preset.decay_rate)
    if preset.schedule == "piecewise":  # tf piecewise_constant: the next value once t > boundary
        return peak * optim.piecewise(t, [int(steps_per_epoch * b) for b in preset.boundaries], preset.decay_rate)
    if preset.schedule == "epoch_steps":  # main_linear.py adjust_learning_rate: per epoch (1-based), after each
        return peak * optim.piecewise(int(t // steps_per_epoch) + 1, preset.boundaries, preset.decay_rate)
    if preset.schedule == "cosine":
        return peak * optim.lr_lambda(t, max(total_steps - warmup, 1), 0, 0.0, "cosine")
    return peak
