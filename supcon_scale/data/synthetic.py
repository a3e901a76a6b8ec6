"""The synthetic backend: random normalised views made on the device, no files, to measure training without I/O."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from supcon_scale import distributed
from supcon_scale.config import DataConfig
from supcon_scale.data.sharding import EpochCursor

BACKEND = "synthetic"
STEPS_PER_EPOCH = 100
DEFAULT_CLASSES = 1000


class SyntheticLoader(EpochCursor):
    """`STEPS_PER_EPOCH` batches per epoch; batch k of an epoch depends only on (seed, epoch, rank, k)."""

    backend = BACKEND
    bad_files = 0

    def __init__(self, cfg: DataConfig, ctx: distributed.Context, seed: int):
        self.cfg, self.ctx, self.seed = cfg, ctx, seed
        self.num_classes = cfg.num_classes or DEFAULT_CLASSES
        self.classes_present = self.num_classes  # labels are drawn from every class
        self.local_batch = cfg.global_batch_size // ctx.world_size
        self.steps_per_epoch = STEPS_PER_EPOCH
        self.num_samples = STEPS_PER_EPOCH * cfg.global_batch_size

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self._begin_pass()
        b, dev = self.local_batch, self.ctx.device
        sizes = self.cfg.view_sizes or [self.cfg.image_size] * self.cfg.views  # multi-crop: each view's own size
        while self.position < self.steps_per_epoch:
            g = torch.Generator(device=dev)
            g.manual_seed(distributed.rank_seed(self.seed, self.ctx.rank, self.epoch, self.position))
            views = [torch.randn(b, 3, s, s, generator=g, device=dev) for s in sizes]
            if dev.type == "cuda":
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            labels = torch.randint(0, self.num_classes, (b,), generator=g, device=dev, dtype=torch.int64)
            self.position += 1
            yield views, labels

    def state_dict(self) -> dict[str, int | str]:
        return self.position_state()

    def load_state_dict(self, state: dict) -> None:
        self.load_position(state)
