"""The `Objective` interface every training step goes through, and the view layout its features arrive in."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from supcon_scale.config import RunConfig
from supcon_scale.distributed import Context
from supcon_scale.hooks import Hook
from supcon_scale.models import Output


def per_sample(out: torch.Tensor | Output, views: int) -> torch.Tensor | Output:
    """The model output for a step's views (`[V*B, D]`, view-major) as `[B, V, D]` in float32 for the loss
    (float64 stays float64: the continual runs' `model.dtype=float64` checks ranks against one process); an
    `Output` field by field."""
    if isinstance(out, Output):
        return Output(*(None if t is None else per_sample(t, views) for t in out))
    assert out.shape[0] % views == 0, f"{out.shape[0]} rows do not split into {views} views"
    out = out if out.dtype == torch.float64 else out.float()
    return out.reshape(views, out.shape[0] // views, -1).transpose(0, 1)


class Objective(nn.Module):
    """`prepare(views, labels) -> (views, targets)` before the forward pass, then `objective(features, targets)`.

    `classifier_classes` is the number of outputs the model's head must have, or None for the projection head;
    `ce_classes` those of a linear classifier beside the projection head (`loss.ce_weight`), or None for none.
    """

    needs_labels = True  # build() refuses a single-class dataset: no negatives, nothing to contrast or classify
    uses_mix_and_kd = False  # build() warns when mix.* / kd.* are set for an objective that ignores them

    def __init__(self, loss: nn.Module, classifier_classes: int | None = None):
        super().__init__()
        self.loss = loss
        self.classifier_classes = classifier_classes
        self.ce_classes: int | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, num_classes: int, ctx: Context) -> Objective:
        """The objective for `cfg` on a dataset of `num_classes` classes, on this rank."""
        raise NotImplementedError

    def prepare(self, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        return views, labels

    def forward(self, features: torch.Tensor | Output, targets: Any) -> torch.Tensor:
        # The momentum encoder's keys feed the queue (loss.queue_size); without one they go unused.
        return self.loss(features.z if isinstance(features, Output) else features, targets)

    def uniform_loss(self, views: int) -> float | None:
        """The loss at total collapse (every logit equal) on a step of `views` views over all ranks, which the
        collapse watch compares the logged loss with; None where it is not one known number."""
        return None

    def convention(self) -> dict:
        """What the loss computes (name, temperature, scale ...), written into every checkpoint's meta."""
        return self.loss.convention()

    def hooks(self) -> list[Hook]:
        """Hooks the objective needs in the training loop (e.g. its key queue); `trainer.build` adds them before
        the Checkpointer, which saves the stateful ones."""
        return []

    def rank_state(self) -> dict[str, Any]:
        """This rank's random state that a resume must restore (tensors and primitives only: weights_only loads)."""
        return {}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Restore what `rank_state` returned."""
