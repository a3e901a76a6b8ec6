"""SupCon (Khosla et al. 2020, eq. 2) on the loader's labels, or SimCLR without them: the projection head's output.

With `loss.ce_weight` > 0, one-stage SupCon + cross-entropy (HobbitLong/SupContrast issues #6, #103, #136): a linear
classifier on the encoder features (`models.Output.logits`) trained with the loss, `supcon + ce_weight * CE`.

With `loss.queue_size` > 0 a `KeyQueue` adds the last K key views of the global batch order to the contrast set
(MoCo's queue, He et al. 2020; labelled as in PaCo, Cui et al. 2021): the momentum encoder's keys when the model
returns them (`Output.keys`), else the encoder's own embeddings, detached (XBM, Wang et al. 2020).
"""

from __future__ import annotations

import math

import torch

from supcon_scale.config import LossConfig, RunConfig
from supcon_scale.distributed import Context
from supcon_scale.hooks import Hook
from supcon_scale.losses import SupConLoss
from supcon_scale.models import Output
from supcon_scale.objectives.base import Objective
from supcon_scale.objectives.cross_entropy import CrossEntropyLoss
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
    """The loader's batch as it is, contrasted by `losses.SupConLoss` (with the key queue's keys, if any); with
    `ce_weight` > 0 plus `ce_weight` times the cross-entropy of the model's classifier logits (every view of a sample
    has the sample's label)."""

    def __init__(
        self, loss: SupConLoss, ce_weight: float = 0.0, num_classes: int | None = None, queue: KeyQueue | None = None
    ):
        super().__init__(loss)
        self.ce_weight = float(ce_weight)
        self.cross_entropy = CrossEntropyLoss()
        self.queue = queue
        if self.ce_weight > 0:
            assert num_classes is not None, "loss.ce_weight needs the number of classes"
            self.ce_classes = num_classes  # the model gets the classifier (models.build(ce_classes=...))

    @classmethod
    def from_config(cls, cfg: RunConfig, num_classes: int, ctx: Context) -> ContrastiveObjective:
        equal = cfg.data.drop_last  # every rank the same batch
        queue = None
        if cfg.loss.queue_size > 0:
            queue = KeyQueue(cfg.loss.queue_size, cfg.model.feat_dim, cfg.data.views, ctx.device, equal)
        return cls(contrastive_loss(cfg.loss, equal_batches=equal), cfg.loss.ce_weight, num_classes, queue)

    def forward(self, features: torch.Tensor | Output, targets: torch.Tensor) -> torch.Tensor:
        """The loss on the embeddings `z` ([B, V, D]) against the batch and the queue's keys (staging this step's
        keys: the momentum encoder's when present, else `z` detached), plus the classifier's weighted CE."""
        z = features.z if isinstance(features, Output) else features
        if self.queue is None:
            loss = self.loss(z, targets)
        else:
            keys, key_labels = self.queue.contents()
            loss = self.loss(z, targets, keys, key_labels)
            own = isinstance(features, Output) and features.keys is not None
            self.queue.stage(features.keys if own else z, targets)
        if self.ce_weight > 0:
            # The local mean over views; DDP's gradient average makes it the global one (equal batches per rank).
            loss = loss + self.ce_weight * self.cross_entropy(features.logits, targets)
        return loss

    def hooks(self) -> list[Hook]:
        return [] if self.queue is None else [self.queue]

    def uniform_loss(self, views: int) -> float | None:
        """log(M - 1), scaled as the loss is: every anchor's softmax over the M - 1 other rows of the contrast set
        (the step's views and the queue's filled keys) is uniform, for L_out and L_in alike. Unknown with CE added or
        the official denominator options."""
        loss = self.loss
        rows = views + (0 if self.queue is None else self.queue.filled * self.queue.views)
        if self.ce_weight > 0 or loss.denominator_mode != "all" or loss.positives_cap is not None or rows < 3:
            return None
        return math.log(rows - 1) * loss.scale_factor()

    def convention(self) -> dict:
        return {**self.loss.convention(), **({"ce_weight": self.ce_weight} if self.ce_weight > 0 else {})}


class SimCLRObjective(ContrastiveObjective):
    """SimCLR ignores labels, so a single-class (unlabelled) dataset is fine."""

    needs_labels = False
