"""Cross-entropy on every view: the supervised baseline trained with the same encoder and budget as SupCon."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from supcon_scale.config import RunConfig
from supcon_scale.distributed import Context
from supcon_scale.objectives.base import Objective

NAME = "cross_entropy"  # `loss.name` of a classifier run: GenSCL's teacher must be one


class CrossEntropyLoss(nn.Module):
    """`logits` `[B, V, C]` (one row per view) and `labels` `[B]`; mean over all views, computed in fp32."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, v, c = logits.shape
        targets = labels.repeat_interleave(v) if labels.ndim == 1 else labels.repeat_interleave(v, dim=0)
        return F.cross_entropy(logits.float().reshape(b * v, c), targets, label_smoothing=self.label_smoothing)

    def convention(self) -> dict:
        return {"name": NAME, "label_smoothing": self.label_smoothing}


class CrossEntropyObjective(Objective):
    """A linear classifier head of `num_classes` outputs in place of the projection head."""

    @classmethod
    def from_config(cls, cfg: RunConfig, num_classes: int, ctx: Context) -> CrossEntropyObjective:
        return cls(CrossEntropyLoss(cfg.loss.label_smoothing), classifier_classes=num_classes)
