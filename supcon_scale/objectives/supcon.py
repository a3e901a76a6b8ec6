"""SupCon (Khosla et al. 2020, eq. 2) on the loader's labels, or SimCLR without them: the projection head's output.

With `loss.queue_size` > 0 a `KeyQueue` adds the last K key views of the global batch order to the contrast set
(MoCo's queue, He et al. 2020; labelled as in PaCo, Cui et al. 2021): the momentum encoder's keys when the model
returns them (`Output.keys`), else the encoder's own embeddings, detached (XBM, Wang et al. 2020).
"""

from __future__ import annotations

import torch

from supcon_scale.config import LossConfig, RunConfig
from supcon_scale.distributed import Context
from supcon_scale.hooks import Hook
from supcon_scale.losses import SupConLoss
from supcon_scale.models import Output
from supcon_scale.objectives.base import Objective
from supcon_scale.objectives.queue import KeyQueue

# The `loss.name`s that `losses.SupConLoss` computes; SimCLR is the one that contrasts views of an image only.
CONTRASTIVE = ("supcon", "simclr", "genscl")
UNLABELLED = "simclr"


def contrastive_loss(cfg: LossConfig, equal_batches: bool = False) -> SupConLoss:
    """The loss `loss.name` (supcon | simclr | genscl) asks for, from the loss section; simclr ignores labels."""
    if cfg.name not in CONTRASTIVE:
        raise ValueError(f"loss.name={cfg.name!r} is not a contrastive loss (supcon, simclr or genscl)")
    return SupConLoss(
        temperature=cfg.temperature,
        variant=cfg.variant,
        contrast=cfg.contrast,
        scale=cfg.scale,
        base_temperature=cfg.base_temperature,
        impl=cfg.impl,
        name=cfg.name,
        denominator_mode=cfg.denominator_mode,
        positives_cap=cfg.positives_cap,
        equal_batches=equal_batches,
        use_labels=cfg.name != UNLABELLED,
    )


class ContrastiveObjective(Objective):
    """The loader's batch as it is, contrasted by `losses.SupConLoss` (with the key queue's keys, if any)."""

    def __init__(self, loss: SupConLoss, queue: KeyQueue | None = None):
        super().__init__(loss)
        self.queue = queue

    @classmethod
    def from_config(cls, cfg: RunConfig, num_classes: int, ctx: Context) -> ContrastiveObjective:
        equal = cfg.data.drop_last  # every rank the same batch
        queue = None
        if cfg.loss.queue_size > 0:
            queue = KeyQueue(cfg.loss.queue_size, cfg.model.feat_dim, cfg.data.views, ctx.device, equal)
        return cls(contrastive_loss(cfg.loss, equal_batches=equal), queue)

    def forward(self, features: torch.Tensor | Output, targets: torch.Tensor) -> torch.Tensor:
        """The loss on the embeddings `z` ([B, V, D]) against the batch and the queue's keys; stages this step's
        keys (the momentum encoder's when present, else `z` detached) for the queue."""
        z = features.z if isinstance(features, Output) else features
        if self.queue is None:
            return self.loss(z, targets)
        keys, key_labels = self.queue.contents()
        loss = self.loss(z, targets, keys, key_labels)
        own = isinstance(features, Output) and features.keys is not None
        self.queue.stage(features.keys if own else z, targets)
        return loss

    def hooks(self) -> list[Hook]:
        return [] if self.queue is None else [self.queue]


class SimCLRObjective(ContrastiveObjective):
    """SimCLR ignores labels, so a single-class (unlabelled) dataset is fine."""

    needs_labels = False
