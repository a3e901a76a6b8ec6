"""What a training step optimises: the batch it prepares (mixing, teacher labels) and the loss on the embeddings.

SupCon and SimCLR use the loader's batch as it is; cross-entropy trains the classifier baseline; GenSCL (seed 001)
mixes each view on device and adds a frozen teacher's predictions as a second set of label vectors:
`loss = GenSCL(z, mixed labels) + kd.alpha * GenSCL(z, teacher probabilities)` (`kd.alpha: inf`: teacher only).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from supcon_scale import losses, teacher
from supcon_scale.config import RunConfig
from supcon_scale.data.mix import ViewMixer
from supcon_scale.distributed import Context, rank_seed
from supcon_scale.losses.cross_entropy import CrossEntropyLoss


class Objective(nn.Module):
    """`prepare(views, labels) -> (views, targets)` before the forward pass, then `objective(features, targets)`."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def prepare(self, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        return views, labels

    def forward(self, features: torch.Tensor, targets: Any) -> torch.Tensor:
        return self.loss(features, targets)

    def convention(self) -> dict:
        return self.loss.convention()


class GenSCLObjective(Objective):
    def __init__(self, loss: nn.Module, mixer: ViewMixer, teacher_model: teacher.Teacher | None, alpha: float):
        super().__init__(loss)
        self.mixer = mixer
        self.teacher = teacher_model
        self.alpha = alpha

    def prepare(self, views, labels):
        if self.mixer.enabled:
            views, vectors = self.mixer(views, labels)
        else:
            one_hot = F.one_hot(labels, self.mixer.num_classes).float()
            vectors = one_hot[:, None].expand(-1, len(views), -1)
        soft = None
        if self.teacher is not None:  # the teacher labels exactly the (mixed) views the student sees
            b = labels.shape[0]
            soft = self.teacher(torch.cat(views)).reshape(len(views), b, -1).transpose(0, 1)
        return views, (vectors, soft)

    def forward(self, features, targets):
        vectors, soft = targets
        if soft is None:
            return self.loss(features, vectors)
        if math.isinf(self.alpha):
            return self.loss(features, soft)
        return self.loss(features, vectors) + self.alpha * self.loss(features, soft)

    def convention(self) -> dict:
        return {**self.loss.convention(), "kd_alpha": self.alpha, "teacher": self.teacher is not None}


def build(cfg: RunConfig, num_classes: int, ctx: Context) -> Objective:
    if cfg.loss.name == "cross_entropy":
        return Objective(CrossEntropyLoss())
    mixing = cfg.mix.prob > 0 and (cfg.mix.mixup_alpha > 0 or cfg.mix.cutmix_alpha > 0)
    if cfg.loss.name != "genscl":
        if mixing or cfg.kd.teacher is not None:
            warnings.warn(f"mix.* and kd.* only act with loss.name=genscl; loss.name={cfg.loss.name} ignores them")
        return Objective(losses.build(cfg.loss))
    mixer = ViewMixer(cfg.mix, num_classes, seed=rank_seed(cfg.seed, ctx.rank, 1))
    teacher_model = None
    if cfg.kd.teacher is not None:
        teacher_model = teacher.load(cfg.kd, num_classes).to(ctx.device)
    return GenSCLObjective(losses.build(cfg.loss), mixer, teacher_model, cfg.kd.alpha)
