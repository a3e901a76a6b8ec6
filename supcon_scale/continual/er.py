"""Experience replay (ER, Chaudhry et al. 2019), the baseline beside SCR: cross-entropy on incoming + memory.

The same memory, memory batch and steps as SCR; as the authors' `agents/exp_replay.py` the loss is the mean
cross-entropy of the incoming batch plus that of the memory batch, on the plain images, and the model is scored by
its softmax head over every class of the dataset (`er.classifier: ncm` scores it as SCR instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from supcon_scale.continual.config import ContinualConfig
from supcon_scale.continual.models import DTYPES, wide
from supcon_scale.continual.views import plain_transform, seeded_views
from supcon_scale.engines import Engine


class ER:
    method = "er"
    supervised_head = True

    def __init__(self, cfg: ContinualConfig):
        self.transforms = [plain_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std)]
        self.classifier = cfg.er.classifier
        self.dtype = DTYPES[cfg.model.dtype]

    def convention(self) -> dict:
        return {"name": "cross_entropy", "method": self.method, "terms": "mean(incoming) + mean(memory)"}

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
        """Each rank sums its samples' losses over the global counts, so DDP's mean over ranks is the global loss."""
        device = engine.ctx.device
        (x,) = seeded_views(images, seeds, self.transforms)
        with engine.autocast():
            logits = engine(x.to(device, self.dtype))
        ce = F.cross_entropy(wide(logits), labels.to(device), reduction="none")
        loss = ce[:n_incoming].sum() / global_incoming
        if global_memory:
            loss = loss + ce[n_incoming:].sum() / global_memory
        loss = loss * engine.ctx.world_size
        engine.backward(loss)
        return loss.detach(), engine.step()
