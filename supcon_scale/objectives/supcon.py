"""SupCon (Khosla et al. 2020, eq. 2) on the loader's labels, or SimCLR without them: the projection head's output."""

from __future__ import annotations

from supcon_scale.config import LossConfig, RunConfig
from supcon_scale.distributed import Context
from supcon_scale.losses import SupConLoss
from supcon_scale.objectives.base import Objective

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
    """The loader's batch as it is, contrasted by `losses.SupConLoss`."""

    @classmethod
    def from_config(cls, cfg: RunConfig, num_classes: int, ctx: Context) -> ContrastiveObjective:
        return cls(contrastive_loss(cfg.loss, equal_batches=cfg.data.drop_last))  # drop_last: every rank the same batch


class SimCLRObjective(ContrastiveObjective):
    """SimCLR ignores labels, so a single-class (unlabelled) dataset is fine."""

    needs_labels = False
