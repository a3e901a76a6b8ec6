"""What a training step optimises: the batch it prepares (mixing, teacher labels), the loss, and the head it needs.

SupCon and SimCLR use the loader's batch as it is on the projection head; cross-entropy trains the classifier
baseline on a linear head; GenSCL (arXiv 2206.00384) mixes each view on device and adds a frozen teacher's
predictions as a second set of label vectors. Only `build` looks at `loss.name`; the trainer asks the objective for
the rest.
"""

from __future__ import annotations

import dataclasses
import warnings

from supcon_scale.config import RunConfig
from supcon_scale.distributed import Context
from supcon_scale.objectives.base import Objective, per_sample
from supcon_scale.objectives.cross_entropy import NAME as CLASSIFIER
from supcon_scale.objectives.cross_entropy import CrossEntropyLoss, CrossEntropyObjective
from supcon_scale.objectives.genscl import GenSCLObjective
from supcon_scale.objectives.mix import mixing
from supcon_scale.objectives.supcon import ContrastiveObjective, SimCLRObjective

__all__ = [
    "ContrastiveObjective",
    "CrossEntropyLoss",
    "CrossEntropyObjective",
    "GenSCLObjective",
    "Objective",
    "SimCLRObjective",
    "build",
    "for_objective",
    "per_sample",
    "trains_classifier",
]

OBJECTIVES: dict[str, type[Objective]] = {
    "supcon": ContrastiveObjective,
    "simclr": SimCLRObjective,
    "genscl": GenSCLObjective,
    "cross_entropy": CrossEntropyObjective,
}


def build(cfg: RunConfig, num_classes: int, ctx: Context, classes_present: int | None = None) -> Objective:
    """The objective `loss.name` asks for, on a dataset of `num_classes` classes (`classes_present` of them with
    images: an empty class folder is a label no sample carries), on this rank."""
    if cfg.loss.name not in OBJECTIVES:
        raise ValueError(f"loss.name={cfg.loss.name!r}: choose one of {', '.join(OBJECTIVES)}")
    kind = OBJECTIVES[cfg.loss.name]
    if kind.needs_labels and min(num_classes, classes_present or num_classes) < 2:
        # One class: every other sample is a positive and none is a negative, so SupCon only pulls embeddings
        # together (collapse) and cross-entropy has nothing to learn. SimCLR ignores labels and is fine.
        raise ValueError(
            f"data.root: {cfg.data.root} has a single class; loss.name={cfg.loss.name} needs at least 2 "
            "(use loss.name=simclr for unlabelled data)"
        )
    if not kind.uses_mix_and_kd and (mixing(cfg.mix) or cfg.kd.teacher is not None):
        warnings.warn(
            f"mix.* and kd.* only act with loss.name=genscl; loss.name={cfg.loss.name} ignores them", stacklevel=2
        )
    if cfg.model.momentum is not None and cfg.loss.queue_size == 0:
        warnings.warn(
            f"model.momentum={cfg.model.momentum}: the momentum encoder's keys feed only the queue, and "
            "loss.queue_size=0 has none (set loss.queue_size, or model.momentum=null)",
            stacklevel=2,
        )
    return kind.from_config(cfg, num_classes, ctx)


def trains_classifier(name: str) -> bool:
    """Whether `loss.name` trains the supervised classifier baseline (cross-entropy) rather than an embedding."""
    return name == CLASSIFIER


def for_objective(cfg: RunConfig, name: str) -> RunConfig:
    """`cfg` with `loss.name=name`; the classifier baseline trains one view per image (`data.views=1`, at
    `data.image_size`: no multi-crop)."""
    classifier = trains_classifier(name)
    views = 1 if classifier else cfg.data.views
    view_sizes = None if classifier else cfg.data.view_sizes
    data = dataclasses.replace(cfg.data, views=views, view_sizes=view_sizes)
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, name=name), data=data)
