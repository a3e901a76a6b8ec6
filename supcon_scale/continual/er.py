"""Experience replay (ER, Chaudhry et al. 2019), the baseline beside SCR: cross-entropy on incoming + memory.

The same memory, memory batch and steps as SCR; as the authors' `agents/exp_replay.py` the loss is the mean
cross-entropy of the incoming batch plus that of the memory batch, on the plain images, and the model is scored by
its softmax head over every class of the dataset (`er.classifier: ncm` scores it as SCR instead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from supcon_scale.continual.config import ContinualConfig
from supcon_scale.continual.views import plain_transform
from supcon_scale.objectives import Objective


class ERObjective(Objective):
    """mean(CE of the incoming batch) + mean(CE of the memory batch) on the classifier head, from this rank's share:
    each rank sums its samples' losses over the global counts (times the world size, as DDP averages over ranks).

    The batch arrives as this rank's `incoming` samples, then its memory samples; `drawn()` is the global size of
    the step's memory batch (the replay hook's draw)."""

    method = "er"

    def __init__(self, cfg: ContinualConfig, num_classes: int, world_size: int, drawn: Callable[[], int]):
        super().__init__(nn.CrossEntropyLoss(reduction="none"), num_classes)
        self.transforms = [plain_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std)]
        self.classifier = cfg.er.classifier
        self.batch, self.world_size, self.drawn = cfg.stream.batch_size, world_size, drawn
        self.incoming = cfg.stream.batch_size // world_size

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = self.loss(features[:, 0], targets)  # features [B, 1, C]: the logits of the one plain view
        loss = ce[: self.incoming].sum() / self.batch
        memory = self.drawn()
        if memory:
            loss = loss + ce[self.incoming :].sum() / memory
        return loss * self.world_size

    def convention(self) -> dict:
        return {"name": "cross_entropy", "method": self.method, "terms": "mean(incoming) + mean(memory)"}
