"""The synthetic backend: random normalised views made on the device, no files, to measure training without I/O."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from supcon_scale import distributed
from supcon_scale.config import DataConfig
from supcon_scale.data import balanced
from supcon_scale.data.sharding import EpochCursor

BACKEND = "synthetic"
STEPS_PER_EPOCH = 100
DEFAULT_CLASSES = 1000


class SyntheticLoader(EpochCursor):
    """`STEPS_PER_EPOCH` batches per epoch; batch k of an epoch depends only on (seed, epoch, rank, k).

    With `data.sampler=m_per_class` the labels follow the balanced plan's classes (`balanced.class_batches`, every
    class of the label space holding images without end): m of each of B/m classes per global batch, strided over
    the ranks as every plan is; the images stay per-rank noise.
    """

    backend = BACKEND
    bad_files = 0

    def __init__(self, cfg: DataConfig, ctx: distributed.Context, seed: int):
        self.cfg, self.ctx, self.seed = cfg, ctx, seed
        self.num_classes = cfg.num_classes or DEFAULT_CLASSES
        self.classes_present = self.num_classes  # labels are drawn from every class
        self.local_batch = cfg.global_batch_size // ctx.world_size
        self.steps_per_epoch = STEPS_PER_EPOCH
        self.num_samples = STEPS_PER_EPOCH * cfg.global_batch_size
        if cfg.sampler == "m_per_class":
            self.sampler = f"m_per_class={cfg.m_per_class}"
            endless = dict.fromkeys(range(self.num_classes), 1 << 62)  # noise: no class runs out of images
            balanced.check_balance(cfg.m_per_class, cfg.global_batch_size, endless)
        self._classes_epoch, self._classes = -1, np.zeros((0, 0), np.int64)  # an epoch's class_batches (balanced)

    def _labels(self, g: torch.Generator) -> torch.Tensor:
        """This rank's labels of the current batch: drawn uniformly, or its share of the balanced global batch."""
        b, dev = self.local_batch, self.ctx.device
        if self.sampler == "random":
            return torch.randint(0, self.num_classes, (b,), generator=g, device=dev, dtype=torch.int64)
        if self._classes_epoch != self.epoch:
            k = self.cfg.global_batch_size // self.cfg.m_per_class
            every = np.arange(self.num_classes)
            self._classes = balanced.class_batches(self.seed, self.epoch, every, k, self.steps_per_epoch)
            self._classes_epoch = self.epoch
        row = np.repeat(self._classes[self.position], self.cfg.m_per_class)
        return torch.from_numpy(row[self.ctx.rank :: self.ctx.world_size].copy()).to(dev)

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
            labels = self._labels(g)
            self.position += 1
            yield views, labels

    def state_dict(self) -> dict[str, int | str]:
        return self.position_state()

    def load_state_dict(self, state: dict) -> None:
        self.load_position(state)
