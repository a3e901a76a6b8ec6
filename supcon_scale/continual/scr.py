"""Supervised Contrastive Replay (Mai et al., CVPR Workshops 2021): SupCon on the incoming and memory batches.

Each step takes the incoming batch and a memory batch drawn beside it (the `Replay` hook), makes two augmented
views of their union and applies the project's `SupConLoss` (temperature 0.07 in the paper) to the normalised
projections of both views in one forward pass (`trainer.train_step`); at test time a nearest-class-mean classifier
over the memory's encoder embeddings (`ncm.py`). The authors' code (`agents/scr.py`) pairs the plain images with
one augmented view (`scr.original_view: true`) and skips steps while the memory is empty; here the first step
already trains, on the incoming batch alone.
"""

from __future__ import annotations

from supcon_scale.continual.config import ContinualConfig
from supcon_scale.continual.views import augment_transform, plain_transform
from supcon_scale.losses import SupConLoss
from supcon_scale.objectives import Objective


class SCRObjective(Objective):
    """SupCon over the views of (incoming | memory) on the projection head; the loss gathers the contrast set over
    ranks. `transforms` make a sample's views (seeded per sample by the stream loader and the replay hook)."""

    method = "scr"
    classifier = "ncm"

    def __init__(self, cfg: ContinualConfig):
        # scale="none": the loss as the paper's Eq. 2 and the authors' utils/loss.py (no tau / base-tau factor)
        super().__init__(SupConLoss(temperature=cfg.scr.temperature, variant="out", contrast="all", scale="none"))
        data = cfg.data
        augment = augment_transform(data.image_size, cfg.scr.augment, data.mean, data.std)
        first = plain_transform(data.image_size, data.mean, data.std) if cfg.scr.original_view else augment
        self.transforms = [first, augment]

    def convention(self) -> dict:
        return {**self.loss.convention(), "method": self.method, "views": len(self.transforms)}
