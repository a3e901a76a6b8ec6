"""Supervised Contrastive Replay (Mai et al., CVPR Workshops 2021): SupCon on the incoming and memory batches.

Each step takes the incoming batch and a memory batch drawn beside it, makes two augmented views of their union and
applies the project's `SupConLoss` (temperature 0.07 in the paper) to the normalised projections of both views in
one forward pass; at test time a nearest-class-mean classifier over the memory's encoder embeddings (`ncm.py`).
The authors' code (`agents/scr.py`) pairs the plain images with one augmented view (`scr.original_view: true`)
and skips steps while the memory is empty; here the first step already trains, on the incoming batch alone.
"""

from __future__ import annotations

import torch
from PIL import Image

from supcon_scale.continual.config import ContinualConfig
from supcon_scale.continual.models import DTYPES, wide
from supcon_scale.continual.views import augment_transform, plain_transform, seeded_views
from supcon_scale.engines import Engine
from supcon_scale.losses import SupConLoss


class SCR:
    method = "scr"
    classifier = "ncm"
    supervised_head = False  # the model's head is a projection, not a classifier

    def __init__(self, cfg: ContinualConfig):
        data = cfg.data
        augment = augment_transform(data.image_size, cfg.scr.augment, data.mean, data.std)
        first = plain_transform(data.image_size, data.mean, data.std) if cfg.scr.original_view else augment
        self.transforms = [first, augment]
        self.dtype = DTYPES[cfg.model.dtype]
        # scale="none": the loss as the paper's Eq. 2 and the authors' utils/loss.py (no tau / base-tau factor)
        self.loss = SupConLoss(temperature=cfg.scr.temperature, variant="out", contrast="all", scale="none")

    def convention(self) -> dict:
        return {**self.loss.convention(), "method": self.method, "views": len(self.transforms)}

    def step(
        self,
        engine: Engine,
        images: list[Image.Image],
        labels: torch.Tensor,
        seeds: list[int],
        n_incoming: int,
        global_incoming: int,
        global_memory: int,
    ) -> tuple[torch.Tensor, bool]:
        """One update on this rank's share of (incoming | memory); the loss gathers the contrast set over ranks."""
        device = engine.ctx.device
        views = [v.to(device, self.dtype) for v in seeded_views(images, seeds, self.transforms)]
        b = labels.shape[0]
        with engine.autocast():
            out = engine(torch.cat(views))
        features = wide(out).reshape(len(views), b, -1).transpose(0, 1)  # [B, V, D]
        loss = self.loss(features, labels.to(device))
        engine.backward(loss)
        return loss.detach(), engine.step()
