"""Training and evaluation data: `build_train_loader` picks a backend for `data.backend` (docs/DESIGN.md, "Data").

Every backend reads the samples of `data.format` (folder, tar shards or CIFAR archives; `data/index.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from supcon_scale import distributed
from supcon_scale.config import DataConfig


class Resumable(Protocol):
    """A position in a run's data that a checkpoint keeps: the Checkpointer needs only this of a loader."""

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainLoader(Resumable, Protocol):
    """What every training backend provides: batches of `(views, labels)`, and a resumable position in the epoch.

    `len()` is the number of batches left in the current epoch; `state_dict()` is this rank's position.
    `num_classes` is the label space (`data.num_classes` or the class folders); `classes_present` the classes that
    hold at least one sample once bad files are left out (an objective that contrasts labels needs two).
    """

    num_classes: int
    classes_present: int
    steps_per_epoch: int

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_train_loader(cfg: DataConfig, ctx: distributed.Context, seed: int, out_dir: Path | None) -> TrainLoader:
    """The training loader for `cfg.backend`: yields `(views, labels)` on `ctx.device`, resumable mid-epoch.

    torchvision: Pillow + v2 transforms in DataLoader workers. dali: DALI on the GPU when one is present, else on the
    CPU; dali-cpu forces the CPU; dali-gpu requires a GPU. synthetic: random tensors (no files) for throughput tests.
    """
    if cfg.backend == "torchvision":
        from supcon_scale.data.torchvision import TorchvisionLoader

        return TorchvisionLoader(cfg, ctx, seed, out_dir)
    if cfg.backend in ("dali", "dali-cpu", "dali-gpu"):
        from supcon_scale.data.dali import DaliLoader

        return DaliLoader(cfg, ctx, seed, out_dir)
    if cfg.backend == "synthetic":
        from supcon_scale.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, ctx, seed)
    raise ValueError(f"data.backend: unknown backend {cfg.backend!r}")


__all__ = ["TrainLoader", "build_train_loader"]
