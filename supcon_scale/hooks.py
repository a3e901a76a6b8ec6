"""The Hook protocol: what monitors, sinks and tests attach to a training run, instead of patching the loop.

`trainer.fit(cfg, ctx, hooks=[...])` calls every hook at four points, in the order given. A hook overrides only the
methods it needs; the defaults do nothing. Hooks run on every rank; one that writes files checks `ctx.is_main` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step left behind, handed to `Hook.on_step` after the step."""

    step: int  # steps done so far, this one included
    epoch: int
    loss: torch.Tensor  # this rank's loss, detached (reading it is a host synchronisation: do it only when needed)
    stepped: bool  # False when the update was skipped (non-finite loss or gradients)
    views: int  # views (images x V) that this step trained on, summed over every rank
    epoch_end: bool  # the last step of its epoch
    last: bool  # the last step of the run
    # This rank's model output of the step, detached, per sample: the `[B, V, D]` embeddings, or a `models.Output`
    # of `[B, V, ...]` fields (the encoder features for the online probe, the CE logits). None where no step ran it.
    output: Any = None
    labels: torch.Tensor | None = None  # this rank's integer labels `[B]` of the step (after the on_batch hooks)


class Hook:
    """Override any of these; each is called on every rank."""

    def on_resume(self, step: int, epoch: int) -> None:
        """The run starts (or continues) after `step` steps, in `epoch`."""

    def on_batch(
        self, step: int, views: list[torch.Tensor], labels: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The batch that step number `step` is about to train on; return it, changed or not."""
        return views, labels

    def on_step(self, info: StepInfo) -> None:
        """After each optimizer step (skipped steps included)."""

    def on_save(self, step: int, path: Path) -> None:
        """Inside a checkpoint save, on every rank: every file is in the temporary directory `path`, which is not
        yet complete (no `meta.json`) and so invisible to resume. A hook may add files of its own here."""


class StatefulHook(Hook):
    """A hook whose state the checkpoints keep (a replay memory, the rows of an accuracy matrix): the Checkpointer
    saves `state_dict()` per rank beside the data position, under `state_key`, and restores it on resume."""

    state_key: str

    def state_dict(self) -> Any:
        """Tensors, primitives and containers of them only (the checkpoint loads with `weights_only`)."""
        raise NotImplementedError

    def load_state_dict(self, state: Any) -> None:
        raise NotImplementedError
