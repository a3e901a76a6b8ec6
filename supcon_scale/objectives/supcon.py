"""SupCon (Khosla et al. 2020, eq. 2) on the loader's labels, or SimCLR without them: the projection head's output."""

from __future__ import annotations

from supcon_scale import losses
from supcon_scale.config import RunConfig
from supcon_scale.distributed import Context
from supcon_scale.objectives.base import Objective


class ContrastiveObjective(Objective):
    """The loader's batch as it is, contrasted by `losses.SupConLoss`."""

    @classmethod
    def from_config(cls, cfg: RunConfig, num_classes: int, ctx: Context) -> ContrastiveObjective:
        return cls(losses.build(cfg.loss, equal_batches=cfg.data.drop_last))  # drop_last: every rank the same batch


class SimCLRObjective(ContrastiveObjective):
    """SimCLR ignores labels, so a single-class (unlabelled) dataset is fine."""

    needs_labels = False
