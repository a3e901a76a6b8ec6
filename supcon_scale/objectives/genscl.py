"""GenSCL (Kim et al., arXiv 2206.00384): label vectors from per-view Mixup/CutMix and a frozen teacher.

`loss = GenSCL(z, mixed labels) + kd.alpha * GenSCL(z, teacher probabilities)` (`kd.alpha: inf`: teacher only).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import nn

from supcon_scale.config import RunConfig
from supcon_scale.distributed import Context, rank_seed
from supcon_scale.models import Output
from supcon_scale.objectives import teacher
from supcon_scale.objectives.base import Objective, per_sample
from supcon_scale.objectives.mix import ViewMixer
from supcon_scale.objectives.supcon import contrastive_loss


class GenSCLObjective(Objective):
    """Mixes each view on device and adds the teacher's predictions as a second set of label vectors."""

    uses_mix_and_kd = True

    def __init__(self, loss: nn.Module, mixer: ViewMixer, teacher_model: teacher.Teacher | None, alpha: float):
        super().__init__(loss)
        self.mixer = mixer
        self.teacher = teacher_model
        self.alpha = alpha

    @classmethod
    def from_config(cls, cfg: RunConfig, num_classes: int, ctx: Context) -> GenSCLObjective:
        mixer = ViewMixer(cfg.mix, num_classes, seed=rank_seed(cfg.seed, ctx.rank, 1))
        teacher_model = None
        if cfg.kd.teacher is not None:
            teacher_model = teacher.load(cfg.kd, num_classes).to(ctx.device)
            if cfg.data.view_sizes:  # multi-crop: the teacher labels the small views too
                teacher_model.check_sizes(sorted(set(cfg.data.view_sizes)), ctx.device)
        return cls(contrastive_loss(cfg.loss, equal_batches=cfg.data.drop_last), mixer, teacher_model, cfg.kd.alpha)

    def prepare(self, views, labels):
        if self.mixer.enabled:
            views, vectors = self.mixer(views, labels)
        else:
            one_hot = F.one_hot(labels, self.mixer.num_classes).float()
            vectors = one_hot[:, None].expand(-1, len(views), -1)
        soft = None
        if self.teacher is not None:  # the teacher labels exactly the (mixed) views the student sees
            soft = per_sample(self.teacher(views), len(views))  # one pass per size (multi-crop)
        return views, (vectors, soft)

    def forward(self, features, targets):
        vectors, soft = targets
        features = features.z if isinstance(features, Output) else features  # the momentum keys: the queue's
        if soft is None:
            return self.loss(features, vectors)
        if math.isinf(self.alpha):
            return self.loss(features, soft)
        return self.loss(features, vectors) + self.alpha * self.loss(features, soft)

    def convention(self) -> dict:
        return {**self.loss.convention(), "kd_alpha": self.alpha, "teacher": self.teacher is not None}

    def rank_state(self) -> dict[str, Any]:
        # Without it a resumed run would redraw the Mixup/CutMix lambdas, boxes and partners from the seed.
        return {"mixer": self.mixer.get_state()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        if "mixer" in state:  # a checkpoint written before the mixer was saved resumes from the seed, as it did
            self.mixer.set_state(state["mixer"])
